"""``python -m models``: every preset with its exact parameter count (abstract shapes, nothing allocated)."""
from models.presets import PRESETS, model_config
from models.summary import count_params


def main() -> None:
    print(f"{'preset':<17} {'family':<7} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} {'mlp':>5} {'ctx':>5} "
          f"{'vocab':>6} {'parameters':>15}")
    for name in PRESETS:
        cfg = model_config(name)
        print(f"{name:<17} {cfg.family:<7} {cfg.n_layers:>6} {cfg.d_model:>7} {cfg.n_heads:>5} {cfg.kv_heads:>3} "
              f"{cfg.mlp_hidden:>5} {cfg.ctx:>5} {cfg.vocab_size:>6} {count_params(cfg):>15,}")
    print("CPU presets are listed with the GPT-2 vocabulary; training uses the corpus tokenizer's vocabulary "
          "(padded to model.vocab_multiple). Any preset takes another family with --config.model.family.")


if __name__ == "__main__":
    main()
