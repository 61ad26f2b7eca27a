"""Sweep expansion: a spec streamed into a prompt table, one bounded chunk at a time.

Row ids are `<prompt key>/<axis>=<value>/...` over the axes with several values, where the prompt
key is the prompts_file's `id`, or `p<position>` for a listed prompt or a file row without one.
Prompt keys must be unique: duplicates are refused here, before anything is written.

Seeds: with a `seed` axis, each row takes its seed from that axis. Without one, all rows of a
prompt share one seed, written into the table's `seed` column: the prompts_file's own `seed`
where it gives one, else `derive_seed(generation.seed, <prompt key>)`. So the cells of a
prompt's contact sheet differ only by the axes compared. (`sdray generate` derives a missing
seed from the row's full id, which here would give every cell another seed.) A sweep with no
axes gets exactly the seeds `sdray generate` gives its prompt table.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from sdray.config import GenerationConfig
from sdray.sweep.spec import SweepSpec, SweepSpecError

CHUNK_ROWS = 65_536
# Columns a sweep adds to every row; a prompts_file may not bring its own.
PROMPT_INDEX_COLUMN = "prompt_index"
PROMPT_ID_COLUMN = "prompt_id"
KEY_COLUMN = "__key"
MAX_NAMED_DUPLICATES = 10


_MASK64 = (1 << 64) - 1


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def prompt_keys(seed: int, prompt_index: np.ndarray) -> np.ndarray:
    """The per-prompt key of the random draw: each prompt draws its own combinations."""
    base = np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64)
    return _mix64(_mix64(prompt_index.astype(np.uint64)) ^ base)


def permute(index: np.ndarray, keys: np.ndarray, size: int) -> np.ndarray:
    """A keyed pseudo-random permutation of [0, size), elementwise: a Feistel network with
    cycle walking. Distinct inputs give distinct outputs, so draws never repeat, and each
    output depends only on (key, index): random mode streams in any chunking."""
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def rounds(x: np.ndarray, k: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for r in range(6):
            salt = np.uint64((r + 1) * 0xD1B54A32D192ED03 & _MASK64)
            left, right = right, left ^ (_mix64(right ^ k ^ salt) & mask)
        return (left << shift) | right

    out = rounds(index.astype(np.uint64), keys)
    outside = out >= np.uint64(size)
    while outside.any():
        out[outside] = rounds(out[outside], keys[outside])
        outside = out >= np.uint64(size)
    return out.astype(np.int64)


def grid_positions(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Each axis' position for flat grid positions; the last axis varies fastest."""
    if not sizes:
        return []
    return [np.asarray(p, dtype=np.int64) for p in np.unravel_index(flat, sizes)]


def _prompt_keys_of(ids: pa.Array | pa.ChunkedArray | None, index: np.ndarray) -> pa.Array:
    """The prompts' keys: their ids as text, or `p<position>` where there is none."""
    import pyarrow.compute as pc

    positional = pa.array([f"p{i}" for i in index], pa.string())
    if ids is None:
        return positional
    text = pc.cast(ids, pa.string())
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    missing = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    return pc.if_else(pc.fill_null(missing, True), positional, text)


def _seeds(column: pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A prompts_file's seeds as int64, parsed as `sdray generate` parses them (CSV is text)."""
    from sdray.requests import as_int

    if pa.types.is_integer(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.int64())
    seeds = []
    for value in column.to_pylist():
        seed = None if value is None else as_int(value)
        if value is not None and (seed is None or not 0 <= seed < 2**63):
            raise SweepSpecError(f"prompts_file: seed={value!r}: must be an integer in [0, 2^63)")
        seeds.append(seed)
    return pa.array(seeds, pa.int64())


def _as_text_schema(schema: pa.Schema, text_columns: list[str]) -> pa.Schema:
    return pa.schema(
        [pa.field(f.name, pa.string()) if f.name in text_columns else f for f in schema]
    )


def _hash_keys(keys: pa.Array) -> np.ndarray:
    """64-bit hashes of keys, to find duplicates in bounded memory (8 bytes per prompt)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(keys.to_pylist(), dtype=object), categorize=False)


def _resolve_images(chunk: pa.Table, folder: str) -> pa.Table:
    """A prompts file's relative init_image/mask_image paths, made absolute from the file's own
    folder: the expanded table lives in the output, elsewhere."""
    from sdray.requests import IMAGE_INPUTS
    from sdray.sweep.spec import resolve_uri

    for name in IMAGE_INPUTS:
        if name in chunk.column_names and pa.types.is_string(chunk.column(name).type):
            values = [resolve_uri(v, folder) for v in chunk.column(name).to_pylist()]
            chunk = chunk.set_column(
                chunk.column_names.index(name), name, pa.array(values, pa.string())
            )
    return chunk


@dataclass
class PromptSource:
    """Where the prompts come from, read in blocks so a huge prompts_file never sits in memory."""

    spec: SweepSpec
    storage_options: dict[str, Any] | None = None
    schema: pa.Schema | None = None  # carried columns of a prompts_file (unified over chunks)
    count: int = 0
    _files: list[dict[str, str]] = field(default_factory=list)
    _text_columns: list[str] = field(default_factory=list)

    def scan(self) -> None:
        """Count the prompts, settle the carried columns' types and refuse duplicate prompt ids
        (one streaming pass; a second only when duplicates are found)."""
        if self.spec.prompts is not None:
            self.count = len(self.spec.prompts)
            self.schema = pa.schema([])
            self._check_images([])
            return
        from sdray.batch.read import column_plan, list_prompt_files
        from sdray.errors import InputError

        try:
            self._files = list_prompt_files(self.spec.prompts_file, self.storage_options)
        except InputError as error:
            raise SweepSpecError(f"prompts_file: {error}") from None
        schemas, hashes = [], []
        for chunk in self._raw_chunks():
            self._check_columns(chunk.column_names)
            schemas.append(chunk.schema)
            hashes.append(_hash_keys(self._keys(chunk, self.count)))
            self.count += chunk.num_rows
        # Parts that disagree on a column's type (int64 in one file, text in another) are read
        # with that column as text everywhere, as `sdray generate` reads them.
        self._text_columns = column_plan(schemas)[0]
        schema = pa.unify_schemas(
            [_as_text_schema(s, self._text_columns) for s in schemas], promote_options="permissive"
        )
        # Without a seed axis, a file's `seed` column gives its prompts' seeds (see Expansion).
        own = {"prompt", "seed"} if self.spec.derives_seeds else {"prompt"}
        self.schema = pa.schema([f for f in schema if f.name not in own])
        if self.count == 0:
            raise SweepSpecError(f"prompts_file: {self.spec.prompts_file!r} holds no rows")
        self._refuse_duplicates(np.concatenate(hashes))
        self._check_images(schema.names)

    def _check_images(self, names: list[str]) -> None:
        has_images = self.spec.init_image is not None or "init_image" in names
        if any(a.name == "strength" for a in self.spec.axis_list) and not has_images:
            raise SweepSpecError(
                "axes.strength: strength is image-to-image's; give init_image (in the spec, "
                "or a column of the prompts_file)"
            )

    def _refuse_duplicates(self, hashes: np.ndarray) -> None:
        ordered = np.sort(hashes)
        suspects = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if not suspects.size:
            return
        counts: Counter[str] = Counter()
        offset = 0
        for chunk in self._raw_chunks():
            keys = self._keys(chunk, offset)
            offset += chunk.num_rows
            hit = np.isin(_hash_keys(keys), suspects)
            counts.update(k for k, h in zip(keys.to_pylist(), hit, strict=True) if h)
        duplicates = sorted(k for k, n in counts.items() if n > 1)
        if duplicates:  # else only a hash collision
            named = ", ".join(repr(k) for k in duplicates[:MAX_NAMED_DUPLICATES])
            more = len(duplicates) - MAX_NAMED_DUPLICATES
            raise SweepSpecError(
                f"prompts_file: {self.spec.prompts_file!r} has duplicate ids: {named}"
                + (f" and {more} more" if more > 0 else "")
                + "; a prompt's id keys its rows' ids and seeds, so ids must be unique "
                "(rows without an id take p<position>)"
            )

    def _check_columns(self, names: list[str]) -> None:
        from sdray.requests import RESULT_COLUMNS

        if "prompt" not in names:
            raise SweepSpecError(
                f"prompts_file: {self.spec.prompts_file!r} has no 'prompt' column "
                f"(columns: {', '.join(names) or 'none'})"
            )
        taken = {PROMPT_INDEX_COLUMN, *RESULT_COLUMNS}
        taken |= {a.name for a in self.spec.axis_list}
        for key in ("negative_prompt", "init_image", "mask_image"):
            if getattr(self.spec, key) is not None:
                taken.add(key)
        clashes = [n for n in names if n in taken]
        if names.count(PROMPT_ID_COLUMN) > 1:
            clashes.append(f"{PROMPT_ID_COLUMN} (the file's `id` becomes {PROMPT_ID_COLUMN})")
        if clashes:
            raise SweepSpecError(
                f"prompts_file: columns {', '.join(clashes)} clash with what the sweep sets "
                "itself (axes, negative_prompt, prompt_index, prompt_id, result columns); "
                "drop or rename them"
            )

    def _raw_chunks(self) -> Iterator[pa.Table]:
        """The prompt table's chunks; a file `id` column becomes `prompt_id`."""
        from sdray.batch.read import conform_chunk, read_prompt_file

        for file in self._files:
            folder = file["uri"].rsplit("/", 1)[0]
            for chunk in read_prompt_file(file, self.storage_options):
                chunk = chunk.select([n for n in chunk.column_names if not n.startswith("__sdray")])
                chunk = conform_chunk(chunk, self._text_columns)
                chunk = _resolve_images(chunk, folder)
                yield chunk.rename_columns(
                    [PROMPT_ID_COLUMN if n == "id" else n for n in chunk.column_names]
                )

    @staticmethod
    def _keys(chunk: pa.Table, offset: int) -> pa.Array:
        index = np.arange(offset, offset + chunk.num_rows, dtype=np.int64)
        ids = chunk.column(PROMPT_ID_COLUMN) if PROMPT_ID_COLUMN in chunk.column_names else None
        return _prompt_keys_of(ids, index)

    def blocks(self) -> Iterator[pa.Table]:
        """Prompt blocks: prompt_index, __key (the id prefix), prompt, the file's seed (when
        the spec has no seed axis), carried columns."""
        if self.spec.prompts is not None:
            prompts = self.spec.prompts
            for start in range(0, len(prompts), CHUNK_ROWS):
                part = prompts[start : start + CHUNK_ROWS]
                index = np.arange(start, start + len(part), dtype=np.int64)
                yield pa.table(
                    {
                        PROMPT_INDEX_COLUMN: index,
                        KEY_COLUMN: _prompt_keys_of(None, index),
                        "prompt": pa.array(part, pa.string()),
                    }
                )
            return
        offset = 0
        carried = self.schema
        for chunk in self._raw_chunks():
            index = np.arange(offset, offset + chunk.num_rows, dtype=np.int64)
            columns = {
                PROMPT_INDEX_COLUMN: pa.array(index),
                KEY_COLUMN: self._keys(chunk, offset),
                "prompt": chunk.column("prompt"),
            }
            offset += chunk.num_rows
            if self.spec.derives_seeds and "seed" in chunk.column_names:
                columns["seed"] = _seeds(chunk.column("seed"))
            for item in carried:
                if item.name in chunk.column_names:
                    columns[item.name] = chunk.column(item.name).cast(item.type)
                else:
                    columns[item.name] = pa.nulls(chunk.num_rows, item.type)
            yield pa.table(columns)


# Spec-level values given to every row.
FIXED_TEXT = ("negative_prompt", "init_image", "mask_image")


@dataclass
class Expansion:
    """The streamed prompt table of a sweep: its schema and its chunks."""

    spec: SweepSpec
    prompts: PromptSource
    base_seed: int = GenerationConfig.model_fields["seed"].default

    @property
    def rows(self) -> int:
        """Rows in the expanded table."""
        return self.prompts.count * self.spec.combinations()

    def schema(self) -> pa.Schema:
        """Columns: id, prompt, negative_prompt?, axes in spec order, seed (derived, when no
        axis gives it), prompt_index, carried columns."""
        fields = [pa.field("id", pa.string()), pa.field("prompt", pa.string())]
        for key in FIXED_TEXT:
            if getattr(self.spec, key) is not None:
                fields.append(pa.field(key, pa.string()))
        fields += [pa.field(a.name, a.arrow_type) for a in self.spec.axis_list]
        if self.spec.derives_seeds:
            fields.append(pa.field("seed", pa.int64()))
        fields.append(pa.field(PROMPT_INDEX_COLUMN, pa.int64()))
        fields += list(self.prompts.schema or [])
        return pa.schema(fields)

    def _axis_positions(self, within: np.ndarray, prompt_index: np.ndarray) -> list[np.ndarray]:
        axes = self.spec.axis_list
        sizes = [a.size for a in axes]
        if self.spec.mode == "zip":
            return [within if s > 1 else np.zeros_like(within) for s in sizes]
        if self.spec.mode == "random":
            keys = prompt_keys(self.spec.seed or 0, prompt_index)
            within = permute(within, keys, math.prod(sizes))
        return grid_positions(within, sizes)

    def _with_seeds(self, block: pa.Table) -> pa.Table:
        """The block with each prompt's seed, when no axis gives seeds: the prompts_file's
        `seed` where it has one, else derived from (base seed, prompt key)."""
        import pyarrow.compute as pc

        from sdray.requests import derive_seed

        if not self.spec.derives_seeds:
            return block
        keys = block.column(KEY_COLUMN).to_pylist()
        derived = pa.array([derive_seed(self.base_seed, key) for key in keys], pa.int64())
        if "seed" not in block.column_names:
            return block.append_column("seed", derived)
        given = block.column("seed")
        seeds = pc.if_else(pc.is_null(given), derived, given)
        return block.set_column(block.column_names.index("seed"), "seed", seeds)

    def chunks(self, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        """The table in chunks of at most `chunk_rows` rows; memory is bounded by one chunk."""
        import pyarrow.compute as pc

        schema = self.schema()
        per_prompt = self.spec.combinations()
        multi = [a for a in self.spec.axis_list if a.size > 1]
        for block in self.prompts.blocks():
            block = self._with_seeds(block)
            block_rows = block.num_rows * per_prompt
            for start in range(0, block_rows, chunk_rows):
                flat = np.arange(start, min(start + chunk_rows, block_rows), dtype=np.int64)
                local, within = flat // per_prompt, flat % per_prompt
                prompts = block.take(pa.array(local))
                prompt_index = prompts.column(PROMPT_INDEX_COLUMN).to_numpy()
                positions = self._axis_positions(within, prompt_index)
                by_name = dict(zip([a.name for a in self.spec.axis_list], positions, strict=True))
                parts = [prompts.column(KEY_COLUMN)] + [a.labels(by_name[a.name]) for a in multi]
                columns: dict[str, Any] = {
                    "id": pc.binary_join_element_wise(*parts, "/") if multi else parts[0],
                    "prompt": prompts.column("prompt"),
                }
                for key in FIXED_TEXT:
                    if getattr(self.spec, key) is not None:
                        columns[key] = pa.array([getattr(self.spec, key)] * len(flat), pa.string())
                for axis, position in zip(self.spec.axis_list, positions, strict=True):
                    columns[axis.name] = axis.take(position)
                if self.spec.derives_seeds:
                    columns["seed"] = prompts.column("seed")
                columns[PROMPT_INDEX_COLUMN] = prompts.column(PROMPT_INDEX_COLUMN)
                for item in self.prompts.schema or []:
                    columns[item.name] = prompts.column(item.name)
                yield pa.table(columns, schema=schema)


def plan_expansion(
    spec: SweepSpec,
    storage_options: dict[str, Any] | None = None,
    *,
    base_seed: int = GenerationConfig.model_fields["seed"].default,
) -> Expansion:
    """Scan the prompts (refusing duplicate ids) and return the lazy expansion of a spec;
    `base_seed` is the config's generation.seed, from which seeds derive without a seed axis."""
    prompts = PromptSource(spec, storage_options)
    prompts.scan()
    return Expansion(spec, prompts, base_seed)


def write_expansion(
    expansion: Expansion,
    uri: str,
    storage_options: dict[str, Any] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Stream the expansion into one Parquet file, one row group per chunk; returns the rows."""
    import pyarrow.parquet as pq

    from sdray.storage import filesystem, is_local

    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    rows = 0
    with fs.open(path, "wb") as handle:
        with pq.ParquetWriter(handle, expansion.schema(), compression="zstd") as writer:
            for chunk in expansion.chunks(chunk_rows):
                writer.write_table(chunk, row_group_size=chunk_rows)
                rows += chunk.num_rows
    return rows
