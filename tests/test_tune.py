"""`mldcn tune` end to end on a real 1,000-row Criteo sample: Optuna studies per architecture
with the same budget, config files that `mldcn train --config` applies, and a resume that
re-runs nothing (and runs exactly what a raised budget adds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.cli import main
from model.presets import EMBEDDING_L2
from model.tune import SEARCH_SPACE

optuna = pytest.importorskip("optuna")


def _trials(out: Path, study: str) -> list:
    storage = f"sqlite:///{(out / 'optuna.db').resolve()}"
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_tune_writes_configs_and_resumes_without_rerunning(shared_data, tmp_path) -> None:
    data = str(shared_data / "criteo_sample" / "criteo_kaggle_raw_1k.tsv")
    out = tmp_path / "tune"
    args = ["tune", "--data", data, "--archs", "dcnv2,mldcn", "--level", "small", "--trials",
            "3", "--epochs", "2", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["archs"]) == {"dcnv2", "mldcn"}
    numbers = {}
    for arch in ("dcnv2", "mldcn"):
        trials = _trials(out, f"{arch}-small")
        assert len(trials) == 3 and all(t.state.is_finished() for t in trials)
        numbers[arch] = sorted(t.number for t in trials)
        # the search starts from the default recipe: the preset's settings, lr 1e-3, batch 1024
        first = min(trials, key=lambda t: t.number)
        assert first.params == {"lr": 1e-3, "batch_size": 1024, "dropout": 0.0,
                                "batch_norm": False, "embedding_l2": EMBEDDING_L2}
        done = [t for t in trials if t.state.name == "COMPLETE"]
        assert all(len(t.user_attrs["seed_values"]) == 2 for t in done)  # 2 seeds per trial
        assert all(t.value == pytest.approx(sum(t.user_attrs["seed_values"]) / 2) for t in done)
        config = json.loads((out / f"{arch}-small.json").read_text())
        assert config["arch"] == arch and 0.0 <= config["valid_auc"] <= 1.0
        best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
        assert config["valid_auc"] == best.value
        assert set(config["model"]) | set(config["train"]) == set(SEARCH_SPACE)
        assert config["train"]["lr"] == best.params["lr"]
    # the same command again: every trial is there, nothing runs
    assert main(args) == 0
    for arch in ("dcnv2", "mldcn"):
        assert sorted(t.number for t in _trials(out, f"{arch}-small")) == numbers[arch]
    # a larger budget runs only the difference
    assert main([*args[:-2], "--trials", "4", "--archs", "dcnv2", "--out", str(out)]) == 0
    grown = _trials(out, "dcnv2-small")
    assert len(grown) == 4
    # the resumed sampler draws new settings, not a replay of the first run's start-up draws
    new = max(grown, key=lambda t: t.number)
    assert all(new.params != t.params for t in grown if t is not new)
    # a resume on other settings is refused rather than mixed in
    assert main([*args[:-2], "--lr", "0.01", "--out", str(out)]) == 2
    assert len(_trials(out, "mldcn-small")) == 3
    # the best config trains: its settings land in the run
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--arch", "dcnv2", "--preset", "small", "--config",
                 str(out / "dcnv2-small.json"), "--epochs", "1", "--no-progress", "--threads",
                 "1", "--out", str(run)]) == 0
    config = json.loads((out / "dcnv2-small.json").read_text())
    train = json.loads((run / "train_config.json").read_text())["train"]
    model = json.loads((run / "model_config.json").read_text())["model"]
    assert train["lr"] == config["train"]["lr"]
    assert train["batch_size"] == config["train"]["batch_size"]
    assert model["dropout"] == config["model"]["dropout"]
    assert model["embedding_l2"] == config["model"]["embedding_l2"]


def test_tune_refuses_bad_arguments(shared_data, tmp_path) -> None:
    data = str(shared_data / "criteo_sample" / "criteo_kaggle_raw_1k.tsv")
    base = ["tune", "--data", data, "--out", str(tmp_path / "t")]
    assert main([*base, "--archs", "dcn"]) == 2
    assert main([*base, "--level", "huge"]) == 2
    assert main([*base, "--trials", "0"]) == 2
    assert main([*base, "--seeds-per-trial", "0"]) == 2
    assert main(["tune", "--data", str(tmp_path / "nope.tsv"), "--out", str(tmp_path)]) == 2


def test_tune_confirmation_keeps_the_default_unless_the_gain_is_clear(shared_data,
                                                                      tmp_path) -> None:
    """--confirm-seeds: the best and the default retrain on fresh seeds; the config written is
    the best only when the paired gain's interval is above 0, else the default recipe."""
    data = str(shared_data / "criteo_sample" / "criteo_kaggle_raw_1k.tsv")
    out = tmp_path / "tune"
    assert main(["tune", "--data", data, "--archs", "dcnv2", "--level", "small", "--trials",
                 "3", "--epochs", "2", "--threads", "1", "--seeds-per-trial", "1",
                 "--confirm-seeds", "2", "--out", str(out)]) == 0
    config = json.loads((out / "dcnv2-small.json").read_text())
    check = config["confirmation"]
    assert check["seeds"] == [1000, 1001]
    assert len(check["best_valid_auc"]) == len(check["default_valid_auc"]) == 2
    gains = [b - d for b, d in zip(check["best_valid_auc"], check["default_valid_auc"],
                                   strict=True)]
    assert check["mean_gain"] == pytest.approx(sum(gains) / 2)
    low, high = check["ci95"]
    assert low <= check["mean_gain"] <= high
    settings = {**config["model"], **config["train"]}
    default = {"lr": 1e-3, "batch_size": 1024, "dropout": 0.0, "batch_norm": False,
               "embedding_l2": EMBEDDING_L2}
    best = max((t for t in _trials(out, "dcnv2-small") if t.state.name == "COMPLETE"),
               key=lambda t: t.value)
    assert check["kept"] == ("best" if low > 0 else "default")
    assert settings == (best.params if low > 0 else default)
    assert main(["tune", "--data", data, "--confirm-seeds", "1", "--out", str(out)]) == 2


def test_wide_space_searches_the_architectures_own_settings_at_matched_flops(shared_data,
                                                                            tmp_path) -> None:
    """--space wide: the embedding init scale and each architecture's own keys (conditional
    ones only when their condition holds), the first trial the preset's values, and every
    trial's model within the level's FLOPs tolerance."""
    from model.flops import model_flops
    from model.presets import MATCH_TOLERANCE, preset
    from model.tune import suggest

    # a conditional key is drawn only under its condition
    fixed = {"lr": 1e-3, "batch_size": 1024, "dropout": 0.1, "batch_norm": False,
             "embedding_l2": 1e-3, "embed_init_std": 1e-4}
    mix = suggest(optuna.trial.FixedTrial({**fixed, "dcn_type": "mix", "num_experts": 4}),
                  "dcnv2", "wide")
    assert mix.model["num_experts"] == 4
    full = suggest(optuna.trial.FixedTrial({**fixed, "dcn_type": "full"}), "dcnv2", "wide")
    assert "num_experts" not in full.model and full.model["embed_init_std"] == 1e-4

    data = str(shared_data / "criteo_sample" / "criteo_kaggle_raw_1k.tsv")
    out = tmp_path / "wide"
    args = ["tune", "--data", data, "--archs", "dcnv2,mldcn", "--level", "small", "--trials",
            "4", "--epochs", "1", "--threads", "1", "--seeds-per-trial", "1", "--space", "wide",
            "--out", str(out)]
    assert main(args) == 0
    first = {"lr": 1e-3, "batch_size": 1024, "dropout": 0.0, "batch_norm": False,
             "embedding_l2": EMBEDDING_L2, "embed_init_std": 1e-4}
    own = {"dcnv2": {"dcn_type": "full"},
           "mldcn": {"mask_position": "rank", "mask_source": "x0", "mask_activation": "linear"}}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["space"] == "wide" and set(summary["arch_space"]) == {"dcnv2", "mldcn"}
    # the preset's layout: 26 hashed categorical fields (cardinalities from the prepared data
    # are not stored by tune, so check the matching on the sample's training run instead)
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--arch", "dcnv2", "--preset", "small", "--epochs",
                 "1", "--no-progress", "--threads", "1", "--out", str(run)]) == 0
    layout = json.loads((run / "model_config.json").read_text())
    cards, num_dense = layout["cardinalities"], layout["num_dense"]
    reference = model_flops(preset("dcnv2", "small", cards, num_dense), cards, num_dense).total
    for arch in ("dcnv2", "mldcn"):
        trials = sorted(_trials(out, f"{arch}-small"), key=lambda t: t.number)
        assert len(trials) == 4
        assert trials[0].params == {**first, **own[arch]}
        for t in trials:
            assert set(own[arch]) <= set(t.params)
            model = {k: v for k, v in t.params.items() if k not in ("lr", "batch_size")}
            cfg = preset(arch, "small", cards, num_dense, **model)
            flops = model_flops(cfg, cards, num_dense).total
            assert abs(flops / reference - 1) <= MATCH_TOLERANCE
    config = json.loads((out / "dcnv2-small.json").read_text())
    assert set(own["dcnv2"]) <= set(config["model"])
    # a recipe-space resume of a wide study is refused (other settings)
    assert main([*args[:-4], "--out", str(out)]) == 2


def test_a_trial_without_a_matched_preset_is_pruned_not_fatal(shared_data, tmp_path,
                                                              monkeypatch) -> None:
    """Settings the preset cannot match at this layout (or a diverged run) raise an InputError
    inside a trial: the trial is pruned with its reason and the search goes on."""
    import model.tune as tune
    from model.errors import InputError

    real = tune.train_once

    def picky(data, arch, level, o, train_kw, seed, on_epoch=None):
        if o.train["batch_size"] != 1024:  # every trial but the default's
            raise InputError("cannot match dcnv2 to the small reference")
        return real(data, arch, level, o, train_kw, seed, on_epoch)

    monkeypatch.setattr(tune, "train_once", picky)
    data = str(shared_data / "criteo_sample" / "criteo_kaggle_raw_1k.tsv")
    out = tmp_path / "tune"
    assert main(["tune", "--data", data, "--archs", "dcnv2", "--level", "small", "--trials",
                 "4", "--epochs", "1", "--threads", "1", "--seeds-per-trial", "1",
                 "--out", str(out)]) == 0
    trials = _trials(out, "dcnv2-small")
    assert len(trials) == 4 and trials[0].state.name == "COMPLETE"
    pruned = [t for t in trials if t.params["batch_size"] != 1024]
    assert pruned and all(t.state.name == "PRUNED" and "cannot match" in
                          t.user_attrs["pruned_because"] for t in pruned)


def test_confirmation_survives_a_diverged_run(monkeypatch) -> None:
    """A confirmation run that diverges counts as null: the best is not kept when it diverged,
    and is kept when only the default did; the numbers stay strict JSON."""
    import json as _json

    import model.tune as tune
    from model.errors import InputError

    def fake(diverges: str):
        calls = {"n": 0}

        def train_once(data, arch, level, o, train_kw, seed, on_epoch=None):
            calls["n"] += 1
            which = "best" if o.train.get("lr") == 0.01 else "default"
            if which == diverges and seed == 1001:
                raise InputError("training diverged")
            return (0.70 if which == "best" else 0.69) + 0.001 * (seed - 1000), 3
        return train_once

    best, default = {"lr": 0.01}, {"lr": 0.001}
    monkeypatch.setattr(tune, "train_once", fake("best"))
    check = tune.confirm(None, "dcnv2", "small", best, default, 3, 0, {})
    assert check["kept"] == "default" and check["best_valid_auc"][1] is None
    _json.dumps(check, allow_nan=False)
    monkeypatch.setattr(tune, "train_once", fake("default"))
    check = tune.confirm(None, "dcnv2", "small", best, default, 3, 0, {})
    assert check["kept"] == "best" and check["default_valid_auc"][1] is None
    assert check["mean_gain"] == pytest.approx(0.01)
    _json.dumps(check, allow_nan=False)
