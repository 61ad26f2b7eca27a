"""Multipart uploads (`POST /v1/images/edits`): size limits before and while reading, one image
and an optional mask, text fields apart from files; Starlette's form parser does the parsing."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.requests import Request

from sdray.serve.protocol import ApiError

# Form keys that carry files, and the parameter each one is. OpenAI's clients send one image as
# `image` and a list as `image[]`.
FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}
MAX_FIELDS = 64


@dataclass
class Upload:
    """One uploaded file: the client's name for it (for messages) and its bytes."""

    filename: str
    data: bytes

    def shown(self) -> str:
        return repr(self.filename) if self.filename else f"<{len(self.data)} bytes>"


@dataclass
class EditForm:
    """An edit request's text fields (as sent) and its files."""

    fields: dict[str, str]
    image: Upload
    mask: Upload | None


def _bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


async def read_edit_form(
    request: Request, max_bytes: int, max_text_bytes: int, too_large
) -> EditForm:
    """Parse a multipart/form-data body of at most `max_bytes` (`too_large(size | None)` is the
    413 to raise: by Content-Length before reading, else as soon as the count passes it)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            f"Send the image as multipart/form-data (got Content-Type {content_type or 'none'!r}).",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise too_large(int(declared))

    received = 0
    receive = request.receive

    async def counted():
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise too_large(None)
        return message

    limited = Request(request.scope, counted)
    try:
        async with limited.form(
            max_files=len(FILE_FIELDS) + 2, max_fields=MAX_FIELDS, max_part_size=max_text_bytes
        ) as form:
            fields: dict[str, str] = {}
            files: dict[str, list[Upload]] = {"image": [], "mask": []}
            for key, value in form.multi_items():
                if key in FILE_FIELDS:
                    param = FILE_FIELDS[key]
                    if not isinstance(value, UploadFile):
                        raise _bad(param, f"Invalid value for '{param}': send it as a file.")
                    files[param].append(Upload(value.filename or "", await value.read()))
                elif isinstance(value, UploadFile):
                    raise _bad(
                        key, f"Invalid value for '{key}': a text field, not a file.", "invalid_type"
                    )
                elif key in fields:
                    raise _bad(key, f"Invalid value for '{key}': given more than once.")
                else:
                    fields[key] = value
    except UnicodeDecodeError:
        raise _bad(None, "A form field is not valid UTF-8 text.") from None
    return EditForm(fields, _one_image(files["image"]), _one_mask(files["mask"]))


def _one_image(images: list[Upload]) -> Upload:
    if not images:
        raise _bad("image", "Missing required parameter: 'image'.", "missing_parameter")
    if len(images) > 1:
        raise _bad("image", f"Invalid value for 'image': sdray edits one image, got {len(images)}.")
    return _not_empty("image", images[0])


def _one_mask(masks: list[Upload]) -> Upload | None:
    if len(masks) > 1:
        raise _bad("mask", f"Invalid value for 'mask': one mask, got {len(masks)}.")
    return _not_empty("mask", masks[0]) if masks else None


def _not_empty(param: str, upload: Upload) -> Upload:
    if not upload.data:
        raise _bad(param, f"Invalid value for '{param}': the file {upload.shown()} is empty.")
    return upload
