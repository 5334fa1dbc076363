"""Other GGUFs of one backbone: float32 (every tensor de-quantized) and llama.cpp's own re-quantizations of it.

The torch path runs the bundled GGUF de-quantized to float32 (`load_backbone`), so llama.cpp on the f32 file runs the
very same weights: any difference between the engines is floating point, not the model. Q8_0 and Q4_0 are the
types llama.cpp's batched matrix kernels cover on CPU (many rows decode faster on them than on Q4_1 or Q4_K);
Q8_0 made from the f32 file keeps the bundled weights to within 1/254 of each block's largest value.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def dequantize_gguf(src: str | Path, dst: str | Path) -> Path:
    """Write `dst`, a float32 copy of the GGUF `src` (metadata fields copied as they are)."""
    import gguf
    from tqdm.auto import tqdm

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name == "general.file_type":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, value)
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape"))
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in tqdm(reader.tensors, desc="de-quantizing", leave=False):
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape([int(d) for d in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


DERIVED = ("f32", "q8_0", "q4_0")  # what --gguf accepts by name: made once from the backbone's own GGUF, cached


def quantize_gguf(src: str | Path, dst: str | Path, kind: str) -> Path:
    """Write `dst`, the GGUF `src` quantized by llama.cpp to `kind` (q8_0 or q4_0)."""
    from .llamacpp_backend import _llama

    L = _llama()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    if L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    tmp.replace(dst)
    return dst


def derived_gguf(source: str | Path, kind: str) -> Path:
    """The `kind` (f32, q8_0, q4_0) copy of the GGUF `source`, made once into the cache (f32 first, then llama.cpp's
    quantizer on it) and reused."""
    from ..backbone import cache_dir

    kind, source = kind.lower(), Path(source)
    if kind not in DERIVED:
        raise ValueError(f"unknown GGUF kind {kind!r}: one of {', '.join(DERIVED)}")
    folder = cache_dir() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    stem = source.stem.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
    f32 = folder / f"{stem}-f32.gguf"
    if not f32.is_file():
        dequantize_gguf(source, f32)
    if kind == "f32":
        return f32
    out = folder / f"{stem}-{kind}.gguf"
    return out if out.is_file() else quantize_gguf(f32, out, kind)


def resolve_gguf(backbone_name: str, gguf: str | Path | None) -> Path:
    """--gguf as given: a file, a derived kind of the backbone's own GGUF (f32, q8_0, q4_0), or None for that GGUF."""
    from ..backbone import default_gguf

    if gguf is None:
        return default_gguf(backbone_name)
    if str(gguf).lower() in DERIVED and not Path(gguf).exists():
        return derived_gguf(default_gguf(backbone_name), str(gguf))
    return Path(gguf)
