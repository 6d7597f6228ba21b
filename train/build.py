"""The one place where a run is assembled from its loaded config (``train.config.load_config``):

    config + dataset -> model config -> mesh -> optimizer -> layout (shapes, shardings) -> jitted steps

``build_run(cfg, dataset=...)`` returns a ``Run`` whose parts are built on first use, so that sampling (model
and parameters only), the benchmark and planning (no dataset) and training (everything) take what they need
from the same object. Preparing the dataset is the caller's explicit step (``prepare_dataset``): no part of
a ``Run`` reads or writes data it was not given. Every check of a config that cannot work (mesh, heads,
batch, divisibility, context, vocabulary) happens while the parts are built, before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import os
from functools import cached_property

import jax
import numpy as np

import data
from models import check_attention_length, count_params, model_config, resolve_attention
from optim.orthogonalize import REPLICATED, make_placement
from optim.registry import get as get_optimizer, make_optimizer
from train import executable
from train import mesh as mesh_lib
from train.config import padded_vocab
from train.flops import flops_per_token, lookup_params
from train.state import init_state, make_layout, params_layout, state_from_params
from train.step import batch_sharding, make_eval_step, make_score_step, make_train_step, make_zero_updates

def setup_platform(cfg) -> None:
    """Must run before JAX starts its backends: simulated CPU devices and multi-process init.

    ``multiprocess=True`` calls ``jax.distributed.initialize()``, which auto-detects SLURM, Open MPI and
    TPU pods. Elsewhere (``launch.local``, other clusters) the job is described by the environment:
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0, read by JAX itself), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``.
    """
    if cfg.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cfg.cpu_devices))
    if cfg.multiprocess:
        if cfg.cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if os.environ.get(env):
                kwargs[arg] = int(os.environ[env])
        jax.distributed.initialize(**kwargs)


def prepare_dataset(cfg) -> data.DatasetInfo:
    """The dataset of ``cfg.data``: prepared now (tokenizer trained or the pretrained ``data.tokenizer`` stored,
    shards written) unless ``data.dir`` already holds it (then it must match)."""
    c = cfg.data
    if not c.dir:
        raise ValueError("data.dir is empty: set --config.data.dir to a prepared data dir, or to where data.corpus "
                         "is to be prepared")
    return data.ensure_prepared(c.dir, corpus=c.corpus, vocab_size=c.vocab_size, tokenizer=c.tokenizer or None,
                                eot_token=c.eot_token or None)


def build_model_config(cfg, platform: str):
    """The model of ``cfg.model`` with ``model.vocab_size`` padded to a multiple of ``model.vocab_multiple``;
    ``model.attention="auto"`` picks the kernel for ``platform`` (the devices' ``.platform``: "cpu", "gpu" or
    "tpu"; see ``models.attention.resolve_attention``)."""
    m = cfg.model
    if m.vocab_size < 1:
        raise ValueError(f"model.vocab_size={m.vocab_size}: 0 takes the tokenizer's vocabulary, which only a "
                         "prepared dataset knows (train.config.with_dataset); set --config.model.vocab_size")
    vocab = padded_vocab(m.vocab_size, m.vocab_multiple)
    attention = resolve_attention(m.attention, platform, m.document_mask, m.compute_dtype)
    shape = {k: m[k] for k in ("family", "n_kv_heads", "mlp_width") if m.get(k)}  # "" / 0: the preset's
    model_cfg = model_config(m.name, vocab_size=vocab, compute_dtype=m.compute_dtype, remat=m.remat,
                             dropout=m.dropout, document_mask=m.document_mask, attention=attention, **shape)
    if cfg.seq_len > model_cfg.ctx:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the context of {m.name} ({model_cfg.ctx})")
    check_attention_length(attention, cfg.seq_len)
    return model_cfg


@dataclasses.dataclass
class Run:
    """A run's parts, each built (and checked) on first use. ``cfg`` is the loaded config; ``devices`` the
    devices to run on (default all; a number: that many devices that are not here, see ``build_mesh``);
    ``dataset`` the prepared data that training and evaluation read (None: a run that reads no data)."""
    cfg: object
    devices: list | int | None = None
    platform: str = ""  # of devices given as a number ("gpu", "tpu"); otherwise the devices' own
    dataset: data.DatasetInfo | None = None

    @property
    def data(self) -> data.DatasetInfo:
        if self.dataset is None:
            raise ValueError("this run was built without a dataset (build_run(..., dataset=prepare_dataset(cfg)))")
        return self.dataset

    @cached_property
    def model_cfg(self):
        platform = self.platform or (jax.devices() if self.devices is None else self.devices)[0].platform
        return build_model_config(self.cfg, platform)

    @cached_property
    def mesh(self):
        mesh = mesh_lib.build_mesh(self.cfg.mesh, self.devices)
        mesh_lib.check_model(self.model_cfg, mesh)
        mesh_lib.check_batch(self.cfg.batch_size, self.cfg.microbatches, mesh, jax.process_count())
        return mesh

    @cached_property
    def params_layout(self):
        """The model graph and its parameters' shardings on the mesh (no optimizer needed)."""
        return params_layout(self.model_cfg, self.mesh)

    @cached_property
    def placement(self):
        """Where the optimizer runs Newton-Schulz (``optimizer.orthogonalize``, ``optim.orthogonalize``), or
        None for an optimizer that does not orthogonalise."""
        if not get_optimizer(self.cfg.optimizer.name).orthogonalizes:
            return None
        p = self.params_layout
        return make_placement(self.cfg.optimizer.orthogonalize, self.mesh, p.abstract, p.specs)

    @cached_property
    def optimizer(self):
        return make_optimizer(self.cfg.optimizer, self.cfg.steps, self.placement or REPLICATED)

    def check_optimizer(self) -> None:
        """Build the optimizer from its settings alone (no model, so no vocabulary needed: Newton-Schulz
        replicated), so that a bad optimizer setting fails before a corpus is prepared."""
        make_optimizer(self.cfg.optimizer, self.cfg.steps)

    @cached_property
    def layout(self):
        layout = make_layout(self.params_layout, self.optimizer.tx, self.mesh)
        mesh_lib.check_divisibility(layout.abstract.params, layout.param_specs, self.mesh)
        return layout

    @cached_property
    def train_step(self):
        return self._make_step(diagnostics=False)

    @cached_property
    def step_to_call(self):
        """(the train step the trainer calls, a line saying where it came from): the one saved in
        ``cfg.compiled_step`` when that file holds this program for these devices (``train.executable``), else
        ``train_step`` (compiled on its first call)."""
        if not self.cfg.compiled_step:
            return self.train_step, ""
        loaded, note = executable.load(self.cfg.compiled_step, self)
        return loaded or self.train_step, note

    @cached_property
    def diagnostics_step(self):
        """The train step that also computes ``train.diagnostics`` (see ``make_train_step``)."""
        return self._make_step(diagnostics=True)

    @cached_property
    def zero_updates(self):
        return make_zero_updates(self.layout)

    def _make_step(self, diagnostics: bool):
        return make_train_step(self.layout, self.optimizer.tx, self.optimizer.schedule, self.mesh,
                               microbatches=self.cfg.microbatches, seed=self.cfg.seed,
                               dropout=self.model_cfg.dropout > 0, loss_chunk=self.cfg.loss_chunk,
                               skip_spikes=self.cfg.loss_spike.factor > 0, diagnostics=diagnostics)

    @cached_property
    def eval_step(self):
        return make_eval_step(self.params_layout, self.mesh, self.cfg.loss_chunk)

    @cached_property
    def score_step(self):
        """Per-row log-likelihoods of the masked targets (``train.step.make_score_step``; ``train.tasks``)."""
        return make_score_step(self.params_layout, self.mesh, self.cfg.loss_chunk)

    @property
    def batch_sharding(self):
        return batch_sharding(self.mesh)

    def abstract_batch(self) -> dict:
        """The shapes, dtypes and shardings of one global training batch (for compiling ahead of time)."""
        shape = (self.cfg.batch_size, self.cfg.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32,
                                        sharding=self.batch_sharding)
                for k in ("inputs", "targets", "segment_ids", "loss_mask")}

    @cached_property
    def n_params(self) -> int:
        return count_params(self.model_cfg)  # traces the model's shapes: once per run

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    @cached_property
    def flops_per_step(self) -> float:
        """Analytic model FLOPs of one train step (``train.flops.flops_per_token``)."""
        m = self.model_cfg
        per_token = flops_per_token(self.n_params, lookup_params(m), m.n_layers, m.d_model, self.cfg.seq_len)
        return per_token * self.tokens_per_step

    def check(self) -> "Run":
        """Build every part that a bad config makes fail (optimizer, model, mesh, layout), so that it fails
        now, before anything is written or compiled."""
        self.optimizer
        self.layout  # building the layout builds and checks everything before it
        return self

    def init_state(self):
        """Fresh params (from ``cfg.seed``) and optimizer state, created in their shardings."""
        return init_state(self.model_cfg, self.optimizer.tx, self.layout, self.cfg.seed)

    def state_from_params(self, params):
        """Step 0 and a fresh optimizer state around ``params``."""
        return state_from_params(self.optimizer.tx, self.layout, params)

    def to_global(self, batch: dict) -> dict:
        """This process's rows of a batch -> global arrays sharded over the mesh's batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in batch.items()}

    def train_batches(self, start_step: int):
        """The training batches from ``start_step`` on (this process's rows; a function of the step)."""
        c = self.cfg
        return data.train_iterator(self.data, seq_len=c.seq_len, global_batch_size=c.batch_size, seed=c.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count(),
                                   start_step=start_step, num_threads=c.data.num_threads)

    def eval_batches(self, max_batches: int | None, dataset: data.DatasetInfo | None = None) -> list[dict]:
        """The first ``max_batches`` held-out batches (None: the whole split) of the run's data (or of another
        prepared ``dataset``), as global arrays."""
        c = self.cfg
        return [self.to_global(b) for b in data.eval_batches(
            dataset or self.data, seq_len=c.seq_len, batch_size=c.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), max_batches=max_batches)]


def build_run(cfg, devices=None, platform: str = "", dataset: data.DatasetInfo | None = None) -> Run:
    """The run described by the loaded ``cfg`` on ``devices`` (default: all; a number: that many devices of
    ``platform`` that are not here), reading ``dataset``."""
    if isinstance(devices, int) and not platform:
        raise ValueError("devices given as a number need their platform (gpu, tpu)")
    return Run(cfg, devices, platform, dataset)
