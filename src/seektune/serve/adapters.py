"""Several LoRA/DoRA adapters on one base in memory, chosen per request, loaded at start or at run time.

PEFT does the work: the first adapter wraps the base in a `PeftModel` (its Linear layers gain LoRA
branches, the base weights stay where they are, one copy), each further one is `load_adapter`ed beside it,
and the engine passes `adapter_names` per row so one forward pass serves rows of different adapters
(PEFT's mixed-adapter batches; rows of the base use `__base__`). What is ours: the checks before anything
is loaded (a name that is free, a folder inside the allowed directory with symlinks resolved, a LoRA
adapter and not another kind, trained on this base by its weight fingerprint), and doing the load and
unload on the engine's thread between two decode steps, so no forward pass sees a half-loaded adapter.

Also here: what `seektune serve MODEL_OR_RUN` serves (`resolve_served_model`): a run directory's final
(compressed) model or its trained model, an adapter folder as its base plus that adapter.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seektune.errors import UserError
from seektune.models.fingerprint import base_fingerprint, read_fingerprint
from seektune.serve.engine import Engine, peft_name

logger = logging.getLogger(__name__)

# '@' and '+' for registered versions (quickstart@1.2.0+merged), served under their registry names.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
PEFT_CONFIG_FILE = "adapter_config.json"


class AdapterError(UserError):
    """A refused adapter operation; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServedSource:
    """What a MODEL_OR_RUN argument serves: a base model folder (or hub id) and maybe an adapter on it."""

    base: str
    name: str  # the served name of the base, or of the adapter when `adapter` is set
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)


def resolve_served_model(model_or_run: str) -> ServedSource:
    """A run directory serves its compressed final model when compression ran, else its model/; an adapter
    folder serves its base with the adapter on it; anything else is a model folder or hub id as given."""
    from seektune.models.load import adapter_base

    path = Path(model_or_run).expanduser()
    if not path.exists():
        if model_or_run.startswith((".", "/", "~")) or model_or_run.strip("/").count("/") > 1:
            raise UserError(
                f"{model_or_run} does not exist: give a model folder, a run directory, an adapter folder, a "
                "hub id (org/name) or tiny-deepseek-v3"
            )
        return ServedSource(base=model_or_run, name=model_or_run.rstrip("/").split("/")[-1])
    if not path.is_dir():
        raise UserError(f"{model_or_run} is not a folder: give a model folder, a run directory or a hub id")
    notes: list[str] = []
    if (path / "status.json").is_file():
        final = _compressed_model(path)
        if final is not None:
            notes.append(f"run {path.name}: serving its compressed model {final}")
            path = final
        elif (path / "model").is_dir():
            path = path / "model"
        else:
            raise UserError(
                f"run directory {model_or_run} has no model/ folder: the run did not train a model"
            )
    name = path.parent.name if path.name in ("model", "final") else path.name
    base = adapter_base(str(path))
    if base is not None:
        if not _is_lora(path):
            raise UserError(
                f"{path} holds a {_peft_type(path)} adapter: the server serves LoRA/DoRA adapters on a base; "
                "merge it (seektune compress) or retrain with method.name lora"
            )
        return ServedSource(base=base, name=name, adapter=str(path), notes=notes)
    if (path / "adapters.safetensors").is_file() or (path / "prefix.safetensors").is_file():
        raise UserError(
            f"{path} holds seektune bottleneck adapters or a prefix, which the server cannot attach per "
            "request: retrain with method.name lora (or dora) to serve it"
        )
    return ServedSource(base=str(path), name=name, notes=notes)


def _compressed_model(run: Path) -> Path | None:
    metrics = run / "metrics.json"
    if not metrics.is_file():
        return None
    try:
        final = json.loads(metrics.read_text(encoding="utf-8")).get("compress", {}).get("final_model")
    except ValueError:
        return None
    if not final or final == "None":
        return None
    # Written as the run saw it: absolute, or relative to where the run was started. A moved run keeps
    # its steps under <run>/compress/.
    for candidate in (Path(final), run / "compress" / Path(final).name):
        if candidate.is_dir():
            return candidate
    return None


def _resolved(path: Path, given: Path) -> Path:
    """`path` with symlinks resolved; a 400 for what is no path at all (a NUL byte, a name too long)."""
    try:
        folder = path.resolve()
        folder.is_dir()  # raises for an over-long name
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter path {str(given)[:200]!r} is not a usable path ({exc})") from None
    return folder


def _peft_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8")).get("peft_type"))
    except (OSError, ValueError):
        return "unreadable"


def _is_lora(folder: Path) -> bool:
    return (folder / PEFT_CONFIG_FILE).is_file() and _peft_type(folder) == "LORA"


class AdapterSet:
    """The adapters attached to the engine's model, by served name."""

    def __init__(self, engine: Engine, base_name: str, adapter_dir: Path | None = None) -> None:
        self.engine = engine
        self.base_name = base_name
        self.adapter_dir = adapter_dir.expanduser().resolve() if adapter_dir else None
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()
        self._fingerprint: str | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self._paths)

    def path(self, name: str) -> str:
        return self._paths[name]

    def load(self, name: str, path: str | Path, from_admin: bool = False, timeout_s: float = 300.0) -> None:
        """Attach the adapter at `path` as `name`; `from_admin` also requires it inside `adapter_dir`."""
        folder = self._checked_folder(name, Path(path), from_admin)
        with self._lock:
            if name in self._paths or name == self.base_name:
                raise AdapterError(f"a model named {name!r} is already served: unload it first", 409)
            self.engine.call(lambda: self._attach(name, folder)).result(timeout=timeout_s)
            self._paths[name] = str(folder)
        logger.info("adapter %s loaded from %s", name, folder)

    def unload(self, name: str, timeout_s: float = 60.0) -> None:
        """Detach `name`; refused while a request uses it."""
        with self._lock:
            if name not in self._paths:
                loaded = ", ".join(self.names) or "none"
                raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})", 404)
            if name in self.engine.adapters_in_use():
                raise AdapterError(
                    f"adapter {name!r} is answering requests: unload it when they finished", 409
                )
            self.engine.call(lambda: self._detach(name)).result(timeout=timeout_s)
            del self._paths[name]
        logger.info("adapter %s unloaded", name)

    # ----- checks, on the caller's thread

    def _checked_folder(self, name: str, path: Path, from_admin: bool) -> Path:
        if not ADAPTER_NAME.fullmatch(name) or name == "__base__":
            raise AdapterError(
                f"adapter name {name!r} is not allowed: use 1-128 letters, digits and . _ : @ + -"
            )
        if from_admin:
            if self.adapter_dir is None:
                raise AdapterError(
                    "loading adapters at run time is off: start the server with serve.adapter_dir set to the "
                    "folder the adapters may come from",
                    403,
                )
            folder = _resolved(self.adapter_dir / path if not path.is_absolute() else path, path)
            if not folder.is_relative_to(self.adapter_dir):
                raise AdapterError(
                    f"adapter path {str(path)!r} is outside the allowed adapter directory", 403
                )
        else:
            folder = _resolved(path.expanduser(), path)
        if not folder.is_dir():
            raise AdapterError(f"adapter folder {str(path)!r} does not exist", 404 if from_admin else 400)
        if (folder / "model").is_dir() and (folder / "status.json").is_file():
            folder = folder / "model"  # a run directory
        if not (folder / PEFT_CONFIG_FILE).is_file() or (folder / "config.json").is_file():
            raise AdapterError(
                f"{str(path)!r} is no LoRA adapter folder (no {PEFT_CONFIG_FILE}, or a whole model)"
            )
        if not _is_lora(folder):
            raise AdapterError(
                f"{str(path)!r} holds a PEFT {_peft_type(folder)} adapter; the server serves LoRA/DoRA "
                "adapters"
            )
        if json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8")).get("target_parameters"):
            raise AdapterError(
                f"adapter {str(path)!r} adapts fused expert parameters (target_parameters), which PEFT "
                "cannot mix per request: merge it into the base (seektune compress) and serve that"
            )
        self._check_shapes(folder, path)
        expected = read_fingerprint(folder)
        if expected is not None and expected != self._base_fingerprint():
            raise AdapterError(
                f"adapter {str(path)!r} was trained on another base than the served {self.base_name!r} "
                "(its base weight fingerprint differs): serve it with the base it was trained on"
            )
        return folder

    def _check_shapes(self, folder: Path, shown: Path) -> None:
        """Every LoRA matrix fits a module of the base, checked before PEFT injects anything (a failed
        injection would leave LoRA layers behind in the served model)."""
        from safetensors import safe_open

        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise AdapterError(f"{str(shown)!r} has no adapter_model.safetensors")
        model = self.engine.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        with safe_open(str(weights), framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 - safe_open is not a dict
                if ".lora_A." not in key and ".lora_B." not in key:
                    continue
                module_path = key.removeprefix("base_model.model.").split(".lora_")[0]
                try:
                    module = base.get_submodule(module_path)
                except AttributeError:
                    raise AdapterError(
                        f"adapter {str(shown)!r} adapts {module_path}, which the served base "
                        f"{self.base_name!r} does not have: serve it with the base it was trained on"
                    ) from None
                module = getattr(module, "base_layer", module)
                shape = tensors.get_slice(key).get_shape()
                size, wanted = (shape[1], "in_features") if ".lora_A." in key else (shape[0], "out_features")
                have = getattr(module, wanted, None)
                if have is not None and have != size:
                    raise AdapterError(
                        f"adapter {str(shown)!r} does not fit the served base {self.base_name!r}: {key} "
                        f"expects {wanted} {size}, the base's {module_path} has {have}; serve it with "
                        "the base it was trained on"
                    )

    def _base_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = base_fingerprint(self.engine.model)
        return self._fingerprint

    # ----- on the engine's thread

    def _attach(self, name: str, folder: Path) -> None:
        from seektune.models.methods import load_adapter

        if any(type(m).__name__ == "FbgemmInt8Linear" for m in self.engine.model.modules()):
            raise AdapterError(
                "the served base runs on fbgemm int8 kernels, which LoRA cannot wrap: start the server with "
                "--set model.int8_kernel=torchao to serve adapters on an int8 base"
            )
        try:
            model = load_adapter(self.engine.model, folder, adapter_name=peft_name(name))
        except (RuntimeError, ValueError, KeyError) as exc:
            self._forget(name)
            lines = str(exc).splitlines() or [repr(exc)]
            first = next((line.strip() for line in lines if "size mismatch" in line), lines[0].strip())
            raise AdapterError(
                f"adapter {str(folder)!r} does not fit the served base {self.base_name!r} "
                f"({first.rstrip('.')}): serve it with the base it was trained on"
            ) from exc
        fused = [
            n
            for n, m in model.named_modules()
            if type(m).__name__ == "ParamWrapper" and peft_name(name) in m.lora_A
        ]
        if fused:
            self.engine.model = model
            self._forget(name)
            raise AdapterError(
                f"adapter {str(folder)!r} adapts fused expert parameters ({fused[0]}), which PEFT cannot mix "
                "per request: merge it into the base (seektune compress) and serve the merged model"
            )
        self.engine.model = model.eval()

    def _detach(self, name: str) -> None:
        model: Any = self.engine.model
        name = peft_name(name)
        if set(model.peft_config) == {name}:
            # PEFT cannot run a PeftModel left without adapters (its active adapter names the deleted
            # one): take the LoRA layers out and serve the plain base again, until the next load wraps it.
            self.engine.model = model.unload().eval()
        else:
            model.delete_adapter(name)

    def _forget(self, name: str) -> None:
        """Remove what a failed load may have left behind."""
        model: Any = self.engine.model
        if hasattr(model, "peft_config") and peft_name(name) in model.peft_config:
            try:
                self._detach(name)
            except (ValueError, KeyError):
                model.peft_config.pop(peft_name(name), None)
