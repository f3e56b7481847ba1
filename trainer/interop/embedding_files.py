"""Textual-inversion embeddings as files: the layouts UIs and diffusers load, read and written, and their
tokens added to a tokenizer and text encoder.

Layouts (a file holds one token's vectors, ``N`` of them, one per vector of a multi-vector token):

* AUTOMATIC1111 / ComfyUI, SD 1.x/2.x: one tensor ``emb_params`` ``(N, D)``. AUTOMATIC1111
  (``modules/textual_inversion/textual_inversion.py``, ``EmbeddingDatabase.load_from_file``) takes a
  file with one key, whatever its name, and names the token after the file; ComfyUI
  (``comfy/sd1_clip.py``, ``load_embed``) takes the key ``clip_l`` (``clip_g`` for SDXL's second encoder)
  when present, else the first value. ``emb_params`` is the name kohya's sd-scripts writes.
* AUTOMATIC1111 / ComfyUI, SDXL: ``clip_l`` ``(N, 768)`` and ``clip_g`` ``(N, 1280)`` (AUTOMATIC1111 needs both
  keys; ComfyUI reads each encoder's by its ``embedding_key``).
* diffusers (``TextualInversionLoaderMixin.load_textual_inversion``): one key, the token itself, ``(N, D)``
  (``learned_embeds.safetensors``; SDXL: ``learned_embeds_2.safetensors`` for ``text_encoder_2``). A
  multi-vector token ``T`` becomes the tokens ``T``, ``T_1``, ..., ``T_{N-1}``, and a prompt's ``T`` is
  expanded to them (``maybe_convert_prompt``); :func:`expand_prompt` does the same.
* AUTOMATIC1111's older ``.pt`` (``string_to_param``: ``{"*": (N, D)}``, ``name``) is read with
  ``torch.load(weights_only=True)`` (tensors, strings and numbers only; a file naming any class, as the
  original textual-inversion code's ``ParameterDict`` does, is refused with the fix: convert it to
  safetensors).

The token of a file: its safetensors metadata ``token`` (written here), else a diffusers file's key, else an
``.pt``'s ``name``, else the file's name without suffix (AUTOMATIC1111's rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lf_common.atomic import atomic_path
from lf_common.errors import DataError
from trainer.interop.safe_load import SAFETENSORS_SUFFIX, load_torch_file

EMB_PARAMS = "emb_params"  # AUTOMATIC1111/ComfyUI/kohya, SD 1.x/2.x
CLIP_L, CLIP_G = "clip_l", "clip_g"  # AUTOMATIC1111/ComfyUI, SDXL's first and second encoder
UI_KEYS = (EMB_PARAMS, CLIP_L, CLIP_G)
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")  # per text encoder
TOKEN_METADATA = "token"
CONVERT_FIX = "convert it to .safetensors (a pickle that names classes can run code and is not read)"

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection


@dataclass
class Embedding:
    """One token's learned vectors.

    Attributes:
        token: the word a prompt uses (``"<d7>"``).
        vectors: per text encoder ``(N, D_i)``: one for SD 1.x/2.x, two for SDXL (CLIP ViT-L, OpenCLIP bigG).
        source: where it came from, for messages.
    """

    token: str
    vectors: list[torch.Tensor]
    source: str = ""

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokenizer tokens of a token's ``num_vectors`` vectors, as diffusers names them: ``T, T_1, ..., T_{N-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, tokenizer: CLIPTokenizer) -> str:
    """``prompt`` with each multi-vector token ``T`` written as its vector tokens ``T T_1 ... T_{N-1}``
    (diffusers' ``maybe_convert_prompt``); single-vector tokens and other text stay."""
    added = tokenizer.added_tokens_encoder
    for token in sorted(added, key=len, reverse=True):
        if f"{token}_1" not in added:
            continue
        count = 1
        while f"{token}_{count}" in added:
            count += 1
        replacement = " ".join(vector_tokens(token, count))
        prompt = re.sub(re.escape(token) + r"(?!_\d)", replacement, prompt)
    return prompt


def safe_name(token: str) -> str:
    """A file name for ``token``: letters, digits, ``._-`` kept (``<d7>`` -> ``d7``)."""
    return "".join(c for c in token if c.isalnum() or c in "._-") or "embedding"


def save_embedding_files(
    folder: str | Path, embedding: Embedding, metadata: dict[str, str] | None = None
) -> list[Path]:
    """Write ``embedding`` in every layout: ``<name>.safetensors`` (AUTOMATIC1111/ComfyUI: ``emb_params``, or
    SDXL's ``clip_l``/``clip_g``) and ``<name>/learned_embeds.safetensors`` (diffusers; SDXL also
    ``learned_embeds_2.safetensors``), each atomically, float32, the token in the metadata.

    Returns:
        The files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = safe_name(embedding.token)
    meta = {TOKEN_METADATA: embedding.token, "num_vectors": str(embedding.num_vectors), **(metadata or {})}
    vectors = [v.detach().float().cpu().contiguous() for v in embedding.vectors]
    ui = {EMB_PARAMS: vectors[0]} if len(vectors) == 1 else {CLIP_L: vectors[0], CLIP_G: vectors[1]}
    written = [folder / f"{name}{SAFETENSORS_SUFFIX}"]
    with atomic_path(written[0]) as tmp:
        save_file(ui, str(tmp), metadata=meta)
    with atomic_path(folder / name) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        for file, vector in zip(DIFFUSERS_FILES, vectors, strict=False):
            save_file({embedding.token: vector.clone()}, str(tmp / file), metadata=meta)
    written += [folder / name / file for file in DIFFUSERS_FILES[: len(vectors)]]
    return written


BUNDLE_PREFIX = "bundle_emb."


def bundle_keys(embeddings: list[Embedding]) -> dict[str, torch.Tensor]:
    """The embeddings as a LoRA or LyCORIS file bundles them (kohya's sd-scripts and AUTOMATIC1111's Lora extension,
    which reads them from any network file: ``bundle_emb.<token>.<what an embedding file holds>``, the keys of an
    embedding file as ComfyUI's ``load_embed`` reads one): SD 1.x/2.x's ``string_to_param.*`` ``(N, D)``, SDXL's
    ``clip_l`` and ``clip_g``."""
    out = {}
    for embedding in embeddings:
        vectors = [v.detach().float().cpu().contiguous() for v in embedding.vectors]
        names = ["string_to_param.*"] if len(vectors) == 1 else [CLIP_L, CLIP_G]
        out |= {f"{BUNDLE_PREFIX}{embedding.token}.{n}": v for n, v in zip(names, vectors, strict=True)}
    return out


def bundle_into(path: str | Path, embeddings: list[Embedding]) -> None:
    """Add ``embeddings`` to the LoRA file ``path`` (:func:`bundle_keys`; its other tensors and metadata kept)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
    with atomic_path(path) as tmp:
        save_file(state | bundle_keys(embeddings), str(tmp), metadata=metadata)


def bundled_embeddings(state: dict[str, torch.Tensor], source: str = "") -> list[Embedding]:
    """The embeddings a LoRA file's ``state`` bundles (:func:`bundle_keys`), in the order of their tokens."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(BUNDLE_PREFIX):
            token, _, what = key.removeprefix(BUNDLE_PREFIX).partition(".")
            parts.setdefault(token, {})[what] = tensor
    out = []
    for token, held in parts.items():
        names = [CLIP_L, CLIP_G] if CLIP_L in held and CLIP_G in held else [k for k in held if k.startswith("string")]
        if not names:
            raise DataError(f"{source}: bundle_emb.{token}.* holds {sorted(held)}, no embedding layout known")
        out.append(Embedding(token, [_rows(held[n], Path(source)) for n in names], source))
    return out


def read_embedding_file(path: str | Path) -> Embedding:
    """An embedding file in any layout of the module docstring (a diffusers folder: its ``learned_embeds*``).

    Raises:
        DataError: no such file, a layout that is no embedding, or a pickle that names classes.
    """
    path = Path(path)
    if path.is_dir():
        files = [path / f for f in DIFFUSERS_FILES if (path / f).is_file()]
        if not files:
            raise DataError(f"embeddings={path}: a folder without {DIFFUSERS_FILES[0]}; give the embedding file")
        parts = [read_embedding_file(f) for f in files]
        return Embedding(parts[0].token, [v for p in parts for v in p.vectors], str(path))
    if not path.is_file():
        raise DataError(f"embeddings={path}: no such file")
    if path.suffix != SAFETENSORS_SUFFIX:
        try:
            state = load_torch_file(path, expected="a textual-inversion embedding file")
        except DataError as error:
            what = str(error).removeprefix(f"{path}: ").split(";")[0]
            raise DataError(f"embeddings={path}: {what}; {CONVERT_FIX}") from None
        return _from_pickle(state, path)
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
    token = metadata.get(TOKEN_METADATA)
    if CLIP_L in state and CLIP_G in state:
        vectors = [state[CLIP_L], state[CLIP_G]]
    elif len(state) == 1:
        ((key, vector),) = state.items()
        vectors = [vector]
        token = token or (key if key not in UI_KEYS else None)
    else:
        raise DataError(
            f"embeddings={path}: holds {sorted(state)[:4]}..., not a textual-inversion embedding (one tensor, "
            f"or {CLIP_L} and {CLIP_G})"
        )
    return Embedding(token or path.stem, [_rows(v, path) for v in vectors], str(path))


def _from_pickle(state: object, path: Path) -> Embedding:
    """AUTOMATIC1111's ``.pt`` (``string_to_param``) or a diffusers ``.bin`` (``{token: tensor}``)."""
    if isinstance(state, dict) and isinstance(state.get("string_to_param"), dict):
        params = state["string_to_param"]
        if len(params) != 1:
            raise DataError(f"embeddings={path}: string_to_param holds {len(params)} terms, expected one")
        name = state.get("name")
        return Embedding(
            name if isinstance(name, str) else path.stem, [_rows(next(iter(params.values())), path)], str(path)
        )
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), torch.Tensor):
        ((key, vector),) = state.items()
        return Embedding(key if key not in UI_KEYS else path.stem, [_rows(vector, path)], str(path))
    raise DataError(f"embeddings={path}: not a textual-inversion embedding (no string_to_param, not one tensor)")


def _rows(vector: torch.Tensor, path: Path) -> torch.Tensor:
    """``(N, D)`` float32 from ``(D,)`` or ``(N, D)``."""
    if vector.ndim == 1:
        vector = vector[None]
    if vector.ndim != 2:
        raise DataError(f"embeddings={path}: a tensor of shape {tuple(vector.shape)}, expected (vectors, width)")
    return vector.detach().float()


def add_embedding(embedding: Embedding, tokenizers: list[CLIPTokenizer], text_encoders: list[TextEncoder]) -> None:
    """Add ``embedding``'s vector tokens to each tokenizer and their rows to each text encoder
    (``add_tokens`` and ``resize_token_embeddings``, as diffusers' ``load_textual_inversion``).

    Raises:
        DataError: the file's encoders or widths do not fit the model, or its token is a word the tokenizer
            already has.
    """
    if len(embedding.vectors) != len(text_encoders):
        kinds = {1: "SD 1.x/2.x (one text encoder)", 2: "SDXL (clip_l and clip_g)"}
        raise DataError(
            f"embeddings={embedding.source}: an embedding for {kinds.get(len(embedding.vectors), '?')}, but the "
            f"model has {len(text_encoders)} text encoder(s); use one trained for this model's kind"
        )
    names = vector_tokens(embedding.token, embedding.num_vectors)
    for tokenizer, encoder, vector in zip(tokenizers, text_encoders, embedding.vectors, strict=True):
        width = encoder.get_input_embeddings().weight.shape[1]
        if vector.shape[1] != width:
            raise DataError(
                f"embeddings={embedding.source}: vectors of width {vector.shape[1]}, but the text encoder's are "
                f"{width} wide: an embedding of another base model"
            )
        if any(name in tokenizer.get_vocab() for name in names):
            raise DataError(
                f"embeddings={embedding.source}: token {embedding.token!r} is already a word of the tokenizer "
                "(or loaded twice); rename the file or set its metadata token"
            )
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = encoder.get_input_embeddings().weight
            weight[ids] = vector.to(weight.device, weight.dtype)
