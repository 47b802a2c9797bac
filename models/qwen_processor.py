"""Qwen-Image-Edit's vision-language processor without the video half, so no torchvision.

transformers builds every ``Qwen2VLProcessor`` with a video processor, and its video processors
exist only with torchvision; the image processor has a PIL implementation and the edit pipelines
never pass a video. :class:`Qwen2VLImageOnlyProcessor` is the same processor with the video
processor dropped from its attributes, and :func:`load_image_only_processor` builds it from a
checkpoint's ``processor/`` folder (``AutoImageProcessor`` + ``AutoTokenizer``). With torchvision
installed, ``AutoImageProcessor`` picks the fast image processor, as the pipeline's own loading
does; without it, the PIL one.
"""

from __future__ import annotations

from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin, Qwen2VLProcessor


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for text and images only: ``processor(text=..., images=...)`` gives
    what the full processor gives for the same call."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2VLProcessor.__init__ also wires a video processor; keep its token bookkeeping.
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_image_only_processor(
    name_or_path: str, subfolder: str = "processor"
) -> Qwen2VLImageOnlyProcessor:
    """The image-only processor of a Qwen-Image-Edit checkpoint (a local folder or a Hub id in
    the local cache), from its ``subfolder``."""
    return Qwen2VLImageOnlyProcessor(
        image_processor=AutoImageProcessor.from_pretrained(name_or_path, subfolder=subfolder),
        tokenizer=AutoTokenizer.from_pretrained(name_or_path, subfolder=subfolder),
    )
