"""The layouts edit data sets come in, read into rows of one kind (:mod:`data.rows`).

Three layouts hold (target, references, caption[, mask]) examples:

- a folder with ``metadata.jsonl`` (:class:`data.rows.FolderRows`), ``context`` a path or a list
  of paths;
- control folders, as ai-toolkit and SimpleTuner keep them (:class:`ControlFolderRows`): the
  targets in one folder, each reference in a folder of its own under the same file stem, the
  caption in ``<stem>.txt`` beside the target (or one caption for all), masks in a folder of
  their own under the same stem;
- a JSON Lines file as musubi-tuner writes it (:class:`MusubiJsonlRows`): ``image_path``,
  ``control_path`` or ``control_path_0..N``, ``caption``, optional ``mask_path``, paths relative
  to the file's folder.

:func:`edit_rows` picks the reader the flags describe. Every reader lists all the faults it
finds (a missing control, caption or mask, a stem found in only some folders) in one
:class:`data.images.DataError` when the data set is built, before any model loads, and warns once
about JSON keys it does not read instead of dropping them silently.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from data.images import DataError, ImageRef
from data.rows import (
    FolderRows,
    JsonLinesRows,
    Row,
    RowFields,
    RowSource,
    leaves,
    prompt_problem,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def image_files_by_stem(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The images directly in ``folder`` by file stem, and the stems held by two files."""
    found: dict[str, Path] = {}
    clashes = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name[0] == ".":
            if path.stem in found:
                clashes.append(
                    f"'{folder}': two images named {path.stem!r} ({path.name}, "
                    f"{found[path.stem].name}); keep one"
                )
            found[path.stem] = path
    return found, clashes


class ControlFolderRows(RowSource):
    """Targets in ``targets``, references under the same stem in each of ``control_dirs`` (in
    order), the caption in ``<stem><caption_extension>`` beside the target unless ``caption``
    gives every example one, masks under the same stem in ``mask_dir``.

    Rows are sorted by stem. Every stem in only some folders, missing caption and empty caption
    is a fault, reported together by :func:`data.rows.validated_sizes`.
    """

    def __init__(
        self,
        targets: str | Path,
        control_dirs: Sequence[str | Path],
        fields: RowFields,
        *,
        caption: str | None = None,
        caption_extension: str = ".txt",
        mask_dir: str | Path | None = None,
    ) -> None:
        self.fields = fields
        self.targets = Path(targets)
        self.description = f"{fields.kind} folder '{self.targets}'"
        folders = {"target": self.targets}
        folders |= {fields.numbered(i): Path(d) for i, d in enumerate(control_dirs)}
        if mask_dir is not None:
            folders["mask"] = Path(mask_dir)
        self.names = {"target": "targets", "mask": "masks"}
        self.names |= {fields.numbered(i): f"control {i + 1}" for i in range(len(control_dirs))}
        missing = [
            f"'{folder}' ({self.names[field]})"
            for field, folder in folders.items()
            if not folder.is_dir()
        ]
        if missing:
            raise DataError(f"{self.description}: not a directory: {', '.join(missing)}")
        self._problems: list[str] = []
        files = {}
        for field, folder in folders.items():
            files[field], clashes = image_files_by_stem(folder)
            self._problems += clashes
        self.stems = sorted(files["target"])
        if not self.stems:
            raise DataError(
                f"{self.description}: no images ({', '.join(IMAGE_SUFFIXES)}); with "
                "--control_dirs, --train_data_dir is the folder of target images"
            )
        for field, by_stem in files.items():
            extra = sorted(set(by_stem) - set(self.stems))
            if extra:
                self._problems.append(
                    f"'{folders[field]}': {len(extra)} image(s) with no target of the same name "
                    f"in '{self.targets}': {_shown(extra)}"
                )
        self.files = files
        self.folders = folders
        # Read once here, not at every parse: rows are parsed again for each item and epoch.
        self.captions = {
            stem: self._caption(files["target"][stem], caption, caption_extension)
            for stem in self.stems
        }

    def __len__(self) -> int:
        return len(self.stems)

    def source_problems(self) -> list[str]:
        return list(self._problems)

    @staticmethod
    def _caption(
        target: Path, caption: str | None, extension: str
    ) -> tuple[str | None, str | None]:
        """The example's caption (``caption``, else its caption file), or a fault."""
        if caption is not None:
            return caption, prompt_problem(caption, "--caption")
        path = target.with_suffix(extension)
        if not path.is_file():
            return None, (
                f"'{target}': no caption file '{path.name}' beside it (or give every example "
                "one with --caption)"
            )
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            return None, f"'{path}': not UTF-8 text ({error})"
        return text, prompt_problem(text, f"'{path}'")

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        stem = self.stems[index]
        target = self.files["target"][stem]
        problems, refs = [], {}
        for field, by_stem in self.files.items():
            if stem in by_stem:
                refs[field] = ImageRef(by_stem[stem], f"{self.names[field]} of {stem!r}")
            else:
                problems.append(
                    f"'{target}': no image named {stem!r} in '{self.folders[field]}' "
                    f"({self.names[field]})"
                )
        caption, fault = self.captions[stem]
        if fault:
            problems.append(fault)
        return (None, problems) if problems else (Row(refs, caption), [])


# musubi-tuner's keys: image, numbered controls (or one), caption, mask.
MUSUBI_CONTROL = re.compile(r"control_path(?:_(\d+))?$")


class MusubiJsonlRows(JsonLinesRows):
    """The rows of a musubi-tuner style JSON Lines file: ``image_path`` (target), ``control_path``
    or ``control_path_0..N`` (references, in number order), ``caption``, optional ``mask_path``;
    relative paths are relative to the file's folder, and absolute ones or ones leaving it need
    ``allow_outside``."""

    def __init__(self, path: str | Path, fields: RowFields, allow_outside: bool = False) -> None:
        path = Path(path)
        self.root = path.parent
        self.fields = fields
        self.allow_outside = allow_outside
        self.description = f"{fields.kind} file '{path}'"
        if not path.is_file():
            raise DataError(
                f"'{path}': file does not exist; a JSON Lines data file holds one object per "
                'line: {"image_path", "control_path" or "control_path_0".., "caption", '
                '"mask_path"?}'
            )
        super().__init__(
            path,
            lambda key: key in ("image_path", "caption", "mask_path") or MUSUBI_CONTROL.match(key),
        )

    def _ref(self, value, key: str, where: str) -> ImageRef | str:
        if not isinstance(value, str) or not value:
            return f"{where}: '{key}' must be a path, got {value!r}"
        if not self.allow_outside and leaves(self.root, value):
            return (
                f"{where}: '{key}' {value!r} leaves the file's folder; pass "
                "--allow_paths_outside_data to train on it"
            )
        return ImageRef(self.root / value, f"{where}: {key}")

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        where, record, problems = self.record(index)
        if record is None:
            return None, problems
        controls = sorted(
            (int(match.group(1) or 0), key)
            for key in record
            if (match := MUSUBI_CONTROL.match(key))
        )
        if not controls:
            problems.append(f"{where}: no 'control_path' (or 'control_path_0', ...)")
        keys = [("target", "image_path")] + [
            (self.fields.numbered(i), key) for i, (_, key) in enumerate(controls)
        ]
        if "mask_path" in record:
            keys.append(("mask", "mask_path"))
        refs = {}
        for field, key in keys:
            ref = self._ref(record.get(key), key, where)
            if isinstance(ref, str):
                problems.append(ref)
            else:
                refs[field] = ref
        fault = prompt_problem(record.get("caption"), where)
        if fault:
            problems.append(fault)
        return (None, problems) if problems else (Row(refs, record["caption"]), [])


def edit_rows(
    fields: RowFields,
    *,
    train_data_dir: str | None = None,
    train_data_file: str | None = None,
    control_dirs: Sequence[str] | None = None,
    caption: str | None = None,
    caption_extension: str = ".txt",
    mask_dir: str | None = None,
    allow_paths_outside: bool = False,
) -> RowSource:
    """The rows of whichever layout the arguments describe: ``train_data_file`` (musubi JSON
    Lines), ``train_data_dir`` with ``control_dirs`` (control folders), or ``train_data_dir``
    alone (``metadata.jsonl``).

    Raises:
        DataError: the layout's folder or file is missing, or arguments of another layout given.
    """
    if train_data_file is not None:
        return MusubiJsonlRows(train_data_file, fields, allow_paths_outside)
    if control_dirs:
        return ControlFolderRows(
            train_data_dir,
            control_dirs,
            fields,
            caption=caption,
            caption_extension=caption_extension,
            mask_dir=mask_dir,
        )
    stray = [name for name, value in (("caption", caption), ("mask_dir", mask_dir)) if value]
    if stray:
        flags = " and ".join(f"--{name}" for name in stray)
        raise DataError(f"{flags} read control folders: give --control_dirs too")
    return FolderRows(train_data_dir, fields, allow_paths_outside)


def _shown(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")
