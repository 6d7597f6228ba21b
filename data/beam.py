"""The per-unit preparation as an Apache Beam pipeline: ``python -m data prepare --engine beam ...``.

Planning, the tokenizer and meta.json stay with the launching process (``data.prepare``); the pipeline
fans the unfinished work units out (``Create -> Reshuffle -> Map(prepare_unit)``), and each Beam worker
runs exactly the local path's per-unit function (``data.shards.prepare_unit``), so the files are the same
byte for byte. Every worker reads input files and writes into the data dir, so both must be reachable from
every worker: on gs:// (a worker writes each shard to a local temporary file and uploads it as one object;
this is what Dataflow needs, whose workers share no filesystem), or on a filesystem that every worker mounts
(NFS or Lustre on a Flink or Spark cluster). The workers need this package and its gs:// and input-format
dependencies (on Dataflow: ``--extra_package dist/celo2_harness-0.1.0.tar.gz --requirements_file ...``, or a
worker image). Arguments after the known ones (``--runner=...``) are Beam pipeline options; without them
the pipeline runs on the DirectRunner in this process. Only the DirectRunner has been run, on local dirs and
against a GCS emulator; Dataflow itself has not.
"""
from __future__ import annotations

from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from data import corpus as corpus_lib
from data import shards
from infra.files import is_uri


def run_units(job: shards.UnitJob, units: Sequence[corpus_lib.Unit], beam_args: Sequence[str] = ()) -> None:
    """Prepares ``units`` with a Beam pipeline built from ``beam_args``; returns when all are done."""
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    _check_reachable(job, units, options)
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "units" >> beam.Create(list(units))
             | "spread" >> beam.Reshuffle()
             | "prepare" >> beam.Map(lambda unit, job: shards.prepare_unit(job, unit)["unit"], job))
    missing = [u.index for u in units if shards.read_manifest(job.out, u.index) is None]
    if missing:
        raise ValueError(f"the Beam pipeline finished but units {missing[:10]} wrote no manifest into {job.out}; "
                         "a local data dir must be a filesystem every Beam worker mounts (or use --out gs://...)")


def _check_reachable(job: shards.UnitJob, units: Sequence[corpus_lib.Unit], options: PipelineOptions) -> None:
    """On Dataflow, whose workers share no filesystem with this machine, the input files and the data dir must
    be on object storage: ValueError naming the first local one."""
    if "dataflow" not in (options.view_as(StandardOptions).runner or "").lower():
        return
    local = [path for path in (job.out, *(f.path for u in units for f in u.files)) if not is_uri(path)]
    if local:
        raise ValueError(f"Dataflow workers share no filesystem, and {local[0]} is a local path: put the corpus "
                         "and the data dir on gs:// (--corpus 'gs://bucket/corpus/*.jsonl.zst' --out "
                         "gs://bucket/prepared/name)")
