"""The per-unit preparation as an Apache Beam pipeline: ``python -m data prepare --engine beam ...``.

Planning, the tokenizer and meta.json stay with the launching process (``data.prepare``); the pipeline
fans the unfinished work units out (``Create -> Reshuffle -> Map(prepare_unit)``), and each Beam worker
runs exactly the local path's per-unit function (``data.shards.prepare_unit``), so the files are the same
byte for byte. The data dir is written with ordinary file operations, so it must be a filesystem that every
Beam worker mounts (NFS/Lustre on a Flink or Spark cluster, a GCS FUSE mount on Dataflow), and the workers
need this package installed (e.g. ``--extra_package dist/celo2_harness-0.1.0.tar.gz`` on Dataflow, or a
worker image). Arguments after the known ones (``--runner=...``) are Beam pipeline options; without them
the pipeline runs on the DirectRunner in this process.
"""
from __future__ import annotations

from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from data import corpus as corpus_lib
from data import shards


def run_units(job: shards.UnitJob, units: Sequence[corpus_lib.Unit], beam_args: Sequence[str] = ()) -> None:
    """Prepares ``units`` with a Beam pipeline built from ``beam_args``; returns when all are done."""
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "units" >> beam.Create(list(units))
             | "spread" >> beam.Reshuffle()
             | "prepare" >> beam.Map(lambda unit, job: shards.prepare_unit(job, unit)["unit"], job))
    missing = [u.index for u in units if shards.read_manifest(job.out, u.index) is None]
    if missing:
        raise ValueError(f"the Beam pipeline finished but units {missing[:10]} wrote no manifest into {job.out}; "
                         "is the data dir a filesystem every Beam worker mounts?")
