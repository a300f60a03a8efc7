"""One Screen per mode: chat, help, settings, conversations, file picker, confirm."""
