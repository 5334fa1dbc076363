"""A float32 GGUF from a quantized one: the same metadata and vocabulary, every tensor de-quantized.

The torch path runs the bundled GGUF de-quantized to float32 (`load_backbone`), so llama.cpp on this file runs the
very same weights: any difference between the engines is floating point, not the model.
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
