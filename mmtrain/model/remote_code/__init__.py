"""An exported model directory that transformers loads with no mmtrain installed: `trust_remote_code` modeling files.

`write_remote_code(out, config)` copies the model's own modules into `out`, flat, from this installed package: the
wrapper `mmtrain.model.remote_code.modeling` (as `modeling_mmtrain_vlm.py`) and every mmtrain module it imports,
directly or not (`mmtrain.model.vlm` as `mmtrain_model_vlm.py`, …), each `from mmtrain.a.b import X` rewritten to
`from .mmtrain_a_b import X`. transformers' dynamic-module loader copies the files the modeling file imports
relatively (4.x: only its own imports, so it names every file; 5.x: imports of imports too) and imports them as one
package: the code that runs is mmtrain's, never a second copy. config.json gains `auto_map` (and `architectures`)
beside the VLMConfig fields, so `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` finds the wrapper.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from mmtrain.model.config import CONFIG_NAME, VLMConfig
from mmtrain.model.remote_code.modeling import MMTrainVLMConfig, MMTrainVLMForCausalLM

PACKAGE = "mmtrain"
PACKAGE_DIR = Path(__file__).resolve().parents[2]
ENTRY = MMTrainVLMForCausalLM.__module__
MODELING_FILE = "modeling_mmtrain_vlm"
PROCESSOR_NAME = "preprocessor_config.json"
BICUBIC = 3
"""PIL's (and transformers' PILImageResampling) code for bicubic resampling, the trainer's."""


class BundleError(ValueError):
    """A model module imports mmtrain in a form the flat copy cannot express."""


def module_file(name: str) -> Path:
    """The source file of mmtrain module `name` (a package's `__init__.py`)."""
    relative = Path(*name.split(".")[1:])
    package = PACKAGE_DIR / relative / "__init__.py"
    return package if package.is_file() else (PACKAGE_DIR / relative).with_suffix(".py")


def flat_name(name: str) -> str:
    """The module's file name (without `.py`) in the exported directory."""
    return MODELING_FILE if name == ENTRY else name.replace(".", "_")


def _is_ours(name: str | None) -> bool:
    return name is not None and (name == PACKAGE or name.startswith(PACKAGE + "."))


def _our_imports(name: str, tree: ast.AST) -> list[ast.ImportFrom]:
    """`from mmtrain.… import …` statements anywhere in the module; other forms of importing mmtrain refused."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(_is_ours(alias.name) for alias in node.names):
            raise BundleError(f"{name}:{node.lineno}: `import mmtrain…` cannot be flattened; use `from … import`")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise BundleError(f"{name}:{node.lineno}: relative import; model modules import mmtrain absolutely")
        if isinstance(node, ast.ImportFrom) and _is_ours(node.module):
            if not module_file(node.module).is_file():
                raise BundleError(f"{name}:{node.lineno}: {node.module} is not a module of this package")
            for alias in node.names:
                if module_file(f"{node.module}.{alias.name}").is_file():
                    raise BundleError(f"{name}:{node.lineno}: imports module {node.module}.{alias.name} by name; "
                                      f"import what it defines instead (`from {node.module}.{alias.name} import …`)")
            found.append(node)
    return found


def bundle_modules() -> dict[str, str]:
    """Every module the wrapper needs (itself included) → its source with mmtrain imports rewritten, flat."""
    sources: dict[str, str] = {}
    pending = [ENTRY]
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        sources[name], imported = flatten_imports(name, module_file(name).read_text(encoding="utf-8"))
        pending.extend(imported)
    flat = [flat_name(n) for n in sources]
    if len(set(flat)) != len(flat):
        raise BundleError(f"two modules flatten to one file name: {sorted(flat)}")
    sources[ENTRY] += _import_every_file(sorted(set(sources) - {ENTRY}))
    return sources


def _import_every_file(names: list[str]) -> str:
    """Lines for the modeling file naming every other file of the bundle: transformers 4.x copies into its module
    cache only the files a local directory's modeling file imports itself (5.x follows imports of imports)."""
    lines = [f"from .{flat_name(n)} import __name__ as _{flat_name(n)}  # noqa: E402, F401\n" for n in names]
    return ("\n\n# Added by mmtrain.model.remote_code: every file of the bundle, imported here so that transformers 4.x"
            "\n# (which copies only the files the modeling file imports itself) copies them all.\n" + "".join(lines))


def flatten_imports(name: str, source: str) -> tuple[str, list[str]]:
    """Module `name`'s source with each `from mmtrain.a.b import X as Y` made `from .mmtrain_a_b import X as Y` (in
    place, other lines untouched), and the mmtrain modules it imports."""
    imports = _our_imports(name, ast.parse(source))
    lines = source.splitlines(keepends=True)
    for node in sorted(imports, key=lambda n: n.lineno, reverse=True):
        first = lines[node.lineno - 1].encode()
        last = lines[node.end_lineno - 1].encode()
        head, tail = first[: node.col_offset].decode(), last[node.end_col_offset:].decode()
        if head.strip():  # transformers finds relative imports only at the start of a line
            raise BundleError(f"{name}:{node.lineno}: an import of mmtrain must start its line")
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        lines[node.lineno - 1: node.end_lineno] = [f"{head}from .{flat_name(node.module)} import {names}{tail}"]
    origin = module_file(name).relative_to(PACKAGE_DIR.parent).as_posix()
    header = f"# Copied from {origin} by mmtrain.model.remote_code (mmtrain imports made relative): edit that file.\n"
    return header + "".join(lines), sorted({node.module for node in imports})


def remote_config(config: VLMConfig) -> dict[str, Any]:
    """config.json's content: the VLMConfig fields (as `VLMConfig.save_pretrained` writes them), and `auto_map`
    and `architectures` for transformers (`VLMConfig.from_dict` skips those)."""
    hf = {"architectures": [MMTrainVLMForCausalLM.__name__],
          "auto_map": {"AutoConfig": f"{MODELING_FILE}.{MMTrainVLMConfig.__name__}",
                       "AutoModelForCausalLM": f"{MODELING_FILE}.{MMTrainVLMForCausalLM.__name__}"}}
    return {**config.to_dict(), **hf}


def write_remote_code(out: str | Path, config: VLMConfig) -> list[str]:
    """Write the modeling files and config.json into the existing directory `out` (weights, tokenizer and image
    processor are written by others). Returns the file names written."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: not a directory")
    written = []
    for name, source in sorted(bundle_modules().items()):
        (out / f"{flat_name(name)}.py").write_text(source, encoding="utf-8")
        written.append(f"{flat_name(name)}.py")
    (out / CONFIG_NAME).write_text(json.dumps(remote_config(config), indent=2, sort_keys=True) + "\n")
    return [*written, CONFIG_NAME]


def write_image_processor(out: str | Path, image_config: dict[str, Any]) -> None:
    """preprocessor_config.json for `AutoImageProcessor`: the trainer's preprocessing (`image_processor.json`: size,
    mean, std, resize) as a CLIPImageProcessor, whatever the tower: scale the shortest side to `size` (bicubic),
    centre-crop, rescale to [0, 1], normalise. Written as JSON, not through the class, so transformers 4.x and 5.x
    (where the class's default backend needs torchvision) read the same file. `resize: pad` (pad to a square with
    the mean colour first) has no CLIPImageProcessor switch: it is recorded as LLaVA's `image_aspect_ratio: pad`,
    which callers apply themselves (mmtrain reads it back)."""
    size = int(image_config["size"])
    settings: dict[str, Any] = {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": size}, "resample": BICUBIC,
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(image_config["mean"]), "image_std": list(image_config["std"]),
    }
    if image_config.get("resize") == "pad":
        settings["image_aspect_ratio"] = "pad"
    (Path(out) / PROCESSOR_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
