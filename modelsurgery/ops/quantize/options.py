"""The options of `surgery quantize` (``QuantizeOptions``) and their checks: the preset filled in where the user
left steps, samples and batch size out (``with_preset``), and the refusal of options nothing would read
(``check_unread``) or the output format has no use for (``check_writing``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelsurgery.checkpoint import DEFAULT_MAX_SHARD, parse_size
from modelsurgery.checkpoint.writer import WriteOptions
from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.grids import QuantScheme
from modelsurgery.ops.quantize.params import PRESETS

#: tokens per calibration and evaluation sample when ``QuantizeOptions.seq_len`` is None
SEQ_LEN = 128


@dataclass
class QuantizeOptions(WriteOptions):
    """What to quantize and how; the writing options (``WriteOptions``: dtype, max_shard_size,
    hash_inputs) apply to --format fake and packed (dtype to fake only: see ``check_writing``)."""

    bits: int = 4
    #: the default is what wins benchmarks/bench_quantize_peers.py (README, "Quantize: against the peers")
    method: str = "flexround-signsgd"
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    skip: list[str] = field(default_factory=list)
    default_skips: bool = True
    calib: Path | None = None
    #: calibration samples; None: the preset's (``params.PRESETS``; 128 at "default")
    samples: int | None = None
    #: tokens per calibration and evaluation sample (token data only: given for other data it is refused);
    #: None: ``SEQ_LEN``
    seq_len: int | None = None
    #: the method's parameters to override (steps, lr, batch_size, reg_weight ...: ``method.params``);
    #: any left out, or None, take the method's default
    params: dict[str, Any] = field(default_factory=dict)
    #: learned methods: "fast", "default" or "best" (``params.PRESETS``): steps, samples and batch size
    #: where ``params``/``samples`` leave them out; None: "default" (the method's declared values)
    preset: str | None = None
    grid: str | None = None
    format: str = "fake"
    eval: Path | None = None
    model: str | None = None
    #: the learned methods' batch order; None: 0 (given with RTN, which draws no batches, it is refused)
    seed: int | None = None
    #: the learned methods: return freed memory to the OS at every training step (True), or not; None: True
    #: (given with RTN, which trains nothing, it is refused)
    low_memory: bool | None = None
    #: read the checkpoint a tensor (RTN) or a block (calibration) at a time instead of building the
    #: whole float model first (``streaming.py``); --eval always builds the whole model
    streaming: bool = True
    #: where the block being calibrated and its activations live: cpu, cuda, cuda:N or auto
    device: str = "cpu"
    #: keep cached calibration activations in memory-mapped files in this folder
    offload_dir: Path | None = None
    force: bool = False
    #: --format gguf: "auto" (the folder's tokenizer, as llama.cpp's converter reads it) or "none"; None: auto
    #: (given with another format it is refused: ``check_writing``)
    gguf_tokenizer: str | None = None
    #: a deployment format whose stored grid the quantizer uses (set by ``modelsurgery.deploy.quantize``)
    storage: str | None = None
    #: the dtype ``storage`` keeps scales in when that is the model's (set with it)
    storage_dtype: str | None = None

    def data_files(self) -> list[Path]:
        """The calibration and evaluation files: inputs an output may never replace."""
        return [Path(p) for p in (self.calib, self.eval) if p is not None]

    @property
    def tokens_per_sample(self) -> int:
        return SEQ_LEN if self.seq_len is None else self.seq_len

    @property
    def batch_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    @property
    def frees_memory(self) -> bool:
        return self.low_memory is not False

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.granularity, self.group_size, self.symmetric, self.storage,
                           self.storage_dtype)



def with_preset(opts: QuantizeOptions, method) -> QuantizeOptions:
    """``opts`` with the preset's steps, samples and batch size where the user set none (``params.PRESETS``;
    no preset is "default": the method's declared steps and batch size, 128 samples)."""
    if opts.preset is not None and opts.preset not in PRESETS:
        raise SurgeryError(f"--preset {opts.preset}: expected one of {', '.join(PRESETS)}")
    if opts.preset is not None and not method.learned:
        raise SurgeryError(f"--preset {opts.preset}: --method {method.name} learns nothing (a preset sets the "
                           "steps, samples and batch size of the learned methods)")
    preset = PRESETS[opts.preset or "default"]
    params = {k: v for k, v in opts.params.items() if v is not None}
    if opts.preset is not None and opts.samples is not None and {"steps", "batch_size"} <= params.keys():
        raise SurgeryError(f"--preset {opts.preset}: it sets the steps, samples and batch size left out, and "
                           "--steps, --samples and --batch-size are all given")
    steps, preset_samples, batch_size = preset.for_method(method.name)
    if method.learned and "steps" not in params and steps is not None:
        params["steps"] = steps
    if method.learned and "batch_size" not in params and batch_size is not None:
        params["batch_size"] = batch_size
    samples = opts.samples if opts.samples is not None else preset_samples
    return replace(opts, params=params, samples=samples, preset=preset.name if method.learned else None)


def check_unread(opts: QuantizeOptions, method) -> None:
    """Options that RTN would not read, refused in one line (``opts`` as given, before a preset fills in the
    samples and batch size): the calibration set's without --calib, --seq-len without data, and the training's.
    A learned method reads them all from its --calib data (refused later without it, in its own words);
    --seq-len given for data of feature inputs is refused once the data is read."""
    if method.learned:
        return
    if opts.calib is None:
        for flag, value, what in (("--samples", opts.samples, "it counts calibration samples"),
                                  ("--batch-size", opts.params.get("batch_size"), "it batches calibration samples"),
                                  ("--offload-dir", opts.offload_dir, "it keeps cached calibration activations")):
            if value is not None:
                raise SurgeryError(f"{flag} {value}: {what}, and without --calib there are none")
    if opts.seq_len is not None and opts.calib is None and opts.eval is None:
        raise SurgeryError(f"--seq-len {opts.seq_len}: it cuts calibration and evaluation samples, and without "
                           "--calib or --eval there are none")
    for flag, given, what in (
            (f"--seed {opts.seed}", opts.seed is not None, "it orders the batches a learned method trains on"),
            ("--low-memory" if opts.low_memory else "--fast", opts.low_memory is not None,
             "it applies while a learned method trains a block")):
        if given:
            raise SurgeryError(f"{flag}: {what}; --method {method.name} trains nothing")


def check_writing(opts: QuantizeOptions) -> None:
    """The writing options, refused in one line where the format has no use for them: --dtype casts the float
    tensors of --format fake (its quantized weights included); packed and the deployment formats store their
    scales in the dtype their readers expect, and the deployment writers shard and hash on their own."""
    from modelsurgery.deploy import FORMATS as DEPLOYED

    opts.check_write_options()
    if opts.gguf_tokenizer is not None and opts.format != "gguf":
        raise SurgeryError(f"--gguf-tokenizer {opts.gguf_tokenizer}: only for --format gguf (--format {opts.format} "
                           "writes no tokenizer)")
    if opts.dtype is not None and opts.format != "fake":
        raise SurgeryError(f"--dtype {opts.dtype}: only for --format fake (--format {opts.format} keeps its "
                           "scales in the dtype its readers expect); use surgery dequantize --dtype on its output")
    if opts.format in DEPLOYED:
        given = [flag for flag, used in (("--max-shard-size", parse_size(opts.max_shard_size) != DEFAULT_MAX_SHARD),
                                         ("--no-input-hash", not opts.hash_inputs)) if used]
        if given:
            raise SurgeryError(f"{', '.join(given)}: not available with --format {opts.format} (its writer shards "
                               "and records the inputs itself); use --format fake or packed")
