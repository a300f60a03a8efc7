"""gemma4-chat: a Textual terminal chat app for Gemma 4 (text, images, audio, video, microphone)."""

from __future__ import annotations
