"""The ``compare`` section shared by the comparison presets."""
import ml_collections

# the valid ranges of the section's fields (the rules of infra/ranges.py); compare.lrs.<name> are comma lists
# of positive numbers, checked when the comparison reads them
COMPARE_RANGES = {"compare.optimizers": "nonempty str", "compare.seeds": "int >= 1", "compare.redo_mismatched": "bool",
                  "compare.diagnostics": "str"}


def compare_fields(optimizers: str, seeds: int, lrs: dict) -> ml_collections.ConfigDict:
    """optimizers: comma list of optimizer names (optim.registry); lrs: per optimizer, keyed by its name
    (--config.compare.lrs.celo2_base=... sets one), a comma list of peak learning rates to sweep at seed 0;
    seeds: how many seeds (0..seeds-1) the best rate of each optimizer is run with; redo_mismatched: a run
    made with other settings is set aside and trained again (default: an error naming the differences);
    diagnostics: comma list of diagnostics (``update_ratio``, ``update_cos/attn_qkv.00``: tools.diagnostics_plot)
    the report plots across optimizers, from runs trained with ``diagnostics_every`` > 0."""
    return ml_collections.ConfigDict(dict(optimizers=optimizers, seeds=seeds, lrs=ml_collections.ConfigDict(lrs),
                                          redo_mismatched=False, diagnostics=""))
