"""The one table of media kinds: what each is called in a chat message, as an argument, in the processor's output,
in the config, and in ``mm_token_type_ids``. Everything that handles media by kind reads it from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaKind:
    kind: str                    # chat message part type and placeholder name: "image", "video", "audio"
    arg: str                     # keyword of the processor, generate and ChatSession.send: "images", ...
    inputs: tuple[str, str]      # processor output keys the model takes: (features, positions or mask)
    token_id_attr: str           # ModelConfig attribute holding the soft-token id
    type_id: int                 # its value in mm_token_type_ids (0 is text)
    tower: str                   # which tower encodes it: "vision" or "audio"


MEDIA: tuple[MediaKind, ...] = (
    MediaKind("image", "images", ("pixel_values", "image_position_ids"), "image_token_id", 1, "vision"),
    MediaKind("video", "videos", ("pixel_values_videos", "video_position_ids"), "video_token_id", 2, "vision"),
    MediaKind("audio", "audio", ("input_features", "input_features_mask"), "audio_token_id", 3, "audio"),
)
BY_KIND = {m.kind: m for m in MEDIA}
BY_ARG = {m.arg: m for m in MEDIA}
# Every processor output key the model takes besides input_ids.
MEDIA_KEYS: tuple[str, ...] = tuple(k for m in MEDIA for k in m.inputs)
TEXT_TYPE_ID = 0
