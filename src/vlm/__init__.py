"""Optical context compression lab: vision encoders compress rendered text for small LLMs."""

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
