"""onnxruntime-genai's model builder, quantising each weight as it is emitted (tool environment).

Run by ``edgelm model convert`` as ``python -I convert_build.py <builder arguments>`` in the
conversion tool environment; like :mod:`edgelm.convert_worker` it imports nothing from edgelm.

Why: for int4/int8 the builder first emits every ``MatMul`` with an fp32 weight, keeps the
loaded torch model alive, then serialises the whole fp32 graph to a protobuf and quantises
that copy (``to_nbits``). At its peak it holds the model three to four times over: ~17 GB
for Qwen2.5-1.5B. Here each float ``MatMul`` weight is quantised the moment the builder
emits it, with the same MLAS routine and settings the builder's default quantiser uses
(``DefaultWeightOnlyQuantizer``: blockwise, same block size, symmetry and accuracy level), and
its torch copy is dropped at once. The graph never holds fp32 matmul weights, so the final
whole-graph pass is skipped when nothing is left for it to quantise. Everything else is the
builder's own code: if its internals change so that the hooks do not fit, this falls back
to the unmodified builder (same result, more memory) and says so.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys

COLUMNS_PER_SLICE = 4096
"""Output columns of a weight quantised at a time (fp32 temporaries of ~25-150 MB)."""


# Progress lines in the format the parent reads (edgelm/convert_progress.py, loaded by
# its path: this script runs with -I, see that file).
say = runpy.run_path(os.path.join(os.path.dirname(__file__), "convert_progress.py"))["say"]


def release_checkpoint_pages() -> None:
    """Give back the checkpoint's pages this process has read so far.

    transformers memory-maps the safetensors checkpoint, so each weight's pages become
    resident as the builder reads it and stay so: by the end the whole fp16 model (3 GB for
    Qwen2.5-1.5B) is counted in the builder's memory although each weight, once quantised, is
    never read again. ``MADV_DONTNEED`` on those mappings drops the pages; the weights are
    never written (the builder reads them), so a later read of a weight not yet converted
    faults the same bytes back in from the file. Checked by the conversions here giving
    byte-identical models with and without it.
    """
    import ctypes
    import mmap

    try:
        ranges = []
        with open("/proc/self/maps") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high))
        if not ranges:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        for low, high in ranges:
            libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), mmap.MADV_DONTNEED)
    except (AttributeError, OSError, ValueError):
        pass


def install_hooks() -> bool:
    """Patch the builder's base class; return False (and leave it alone) if it does not fit."""
    try:
        import numpy as np

        # The package puts its own folder on sys.path and the builder script imports its
        # classes from there as the top-level ``builders``: that copy is the one to patch.
        import onnxruntime_genai.models  # noqa: F401
        import torch
        from builders.base import Model  # type: ignore[import-not-found]
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )
        from onnxruntime.quantization.quant_utils import QuantFormat
    except ImportError as exc:
        say(f"eager quantisation unavailable ({exc}); using the builder as is")
        return False
    if not all(hasattr(Model, name) for name in ("make_matmul_nbits", "to_nbits")):
        say("this model builder has no make_matmul_nbits/to_nbits; using it as is")
        return False

    original_nbits = Model.make_matmul_nbits
    original_to_nbits = Model.to_nbits
    counts = {"quantised": 0}

    def make_matmul_nbits(self, matmul, basename, root_input, **kwargs):  # type: ignore[no-untyped-def]
        attrs = self.quant_attrs
        if (
            hasattr(matmul, "qweight")
            or attrs.get("use_qdq")
            or basename in attrs.get("nodes_to_exclude", ())
            or "MatMul" not in attrs.get("op_types_to_quantize", ("MatMul",))
            or not attrs.get("is_symmetric")
            or getattr(self, "int4_customized_weight_config", None)
            or getattr(self, "quantization_algo", "default") != "default"
            or getattr(matmul, "weight", None) is None
            or matmul.weight.dim() != 2
        ):
            return original_nbits(self, matmul, basename, root_input, **kwargs)
        if counts["quantised"] == 0:
            say("model loaded; quantising each weight as it is emitted")
        bits = int(attrs.get("bits", 4))
        block = int(attrs["matmul_block_size"])
        quantizer = DefaultWeightOnlyQuantizer(
            DefaultWeightOnlyQuantConfig(
                block_size=block,
                is_symmetric=True,
                accuracy_level=attrs.get("accuracy_level"),
                quant_format=QuantFormat.QOperator,
                bits=bits,
            )
        )
        weight = matmul.weight.detach()
        n, k = weight.shape
        # Each output column is quantised on its own, so the weight goes through in slices of
        # columns: only a slice is ever in fp32 (the lm_head of Qwen2.5-1.5B is 0.9 GB in
        # fp32, and its transposed copy as much again).
        packed_parts, scale_parts = [], []
        for start in range(0, n, COLUMNS_PER_SLICE):
            part = weight[start : start + COLUMNS_PER_SLICE]
            fp32 = np.ascontiguousarray(part.to(torch.float32).T.numpy())
            packed_part, scales_part, _zeros = quantizer.qbits_block_quant(fp32)
            packed_parts.append(packed_part)
            scale_parts.append(scales_part)
            del fp32
        packed = np.concatenate(packed_parts) if len(packed_parts) > 1 else packed_parts[0]
        scales = np.concatenate(scale_parts) if len(scale_parts) > 1 else scale_parts[0]
        del packed_parts, scale_parts
        # Free the torch copy now; keep a weightless stand-in so shapes stay readable.
        del weight, part
        release_checkpoint_pages()
        with contextlib.suppress(AttributeError, TypeError, RuntimeError):
            matmul.weight = torch.nn.Parameter(torch.empty((n, k), device="meta"), False)
        counts["quantised"] += 1
        if counts["quantised"] % 25 == 0:
            say(f"{counts['quantised']} weights quantised ({basename})")
        # The names ORT's quantiser gives (``<weight>_Q4``, ``<weight>_scales``, node
        # ``<MatMul>_Q4``): the builder's tied embedding (GatherBlockQuantized) refers to the
        # lm_head's quantised weight by them.
        weight_name = basename[1:].replace("/", ".") + ".weight"
        q_name, scales_name = f"{weight_name}_Q{bits}", f"{weight_name}_scales"
        self.make_initializer(torch.from_numpy(packed), q_name)
        self.make_initializer(torch.from_numpy(scales), scales_name, to=self.io_dtype)
        name = f"{basename}_Q{bits}"
        output = "logits" if kwargs.get("logits", False) else f"{name}/output_0"
        node_attrs = {"bits": bits, "block_size": block, "K": k, "N": n}
        if attrs.get("accuracy_level"):
            node_attrs["accuracy_level"] = attrs["accuracy_level"]
        self.make_node(
            "MatMulNBits",
            inputs=[root_input, q_name, scales_name],
            outputs=[output],
            name=name,
            domain="com.microsoft",
            **node_attrs,
        )
        seq_dim = kwargs.get("seq_dim", "sequence_length")
        self.make_value(
            output, self.io_dtype, shape=self.make_hidden_state_shape(seq_dim=seq_dim, last_dim=n)
        )
        return name

    def to_nbits(self):  # type: ignore[no-untyped-def]
        left = [
            node
            for node in self.model.graph
            if node.op_type in self.quant_attrs.get("op_types_to_quantize", ("MatMul",))
            and len(node.inputs) > 1
            and node.inputs[1] is not None
            and node.inputs[1].const_value is not None
        ]
        if left or getattr(self, "exact_quant_override_names", None):
            say(f"{len(left)} weights left for the builder's own quantiser")
            return original_to_nbits(self)
        say(f"{counts['quantised']} weights quantised while building; no whole-graph pass")
        return self.model

    original_save = Model.save_model

    def save_model(self, out_dir):  # type: ignore[no-untyped-def]
        say("saving")
        original_save(self, out_dir)
        say("saved")

    Model.make_matmul_nbits = make_matmul_nbits
    Model.to_nbits = to_nbits
    Model.save_model = save_model
    return True


def main() -> None:
    install_hooks()
    sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[1:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    say("finished")  # the last line carries the step's peak (see convert.run_logged)


if __name__ == "__main__":
    main()
