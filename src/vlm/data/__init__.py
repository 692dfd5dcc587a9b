"""Data: rendering, raw formats -> common samples, webdataset shards, processing, datamodules."""
