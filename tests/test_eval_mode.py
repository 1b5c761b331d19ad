"""--mode=eval on a tiny trained run: one JSON report with FID, classifier accuracies and the ledger."""
import json
import os

import numpy as np
import pytest

from configs import test_tiny
from dpdm_jax import train
from dpdm_jax import evaluate as report
from dpdm_jax.evaluation import inception

WEIGHTS = os.environ.get("DPDM_INCEPTION_NPZ", inception.default_npz_path())


def trained_tiny_run(workdir, num_samples, classifiers, **eval_fields):
    """test_tiny trained 2 steps in `workdir`; its config with the eval section set for the test."""
    config = test_tiny.get_config()
    config.training.max_steps = 2
    config.training.sample_every = -1
    config.eval.num_samples = num_samples
    config.eval.classifiers = classifiers
    for field, value in eval_fields.items():
        config.eval[field] = value
    train.train(config, workdir)
    return config


@pytest.mark.slow
@pytest.mark.real_weights
@pytest.mark.skipif(not os.path.exists(WEIGHTS), reason="converted FID weights absent (see .ci/run)")
def test_eval_report(tmp_path):
    # The environment reaches the app only through main.py: the weights path is a config field.
    config = trained_tiny_run(str(tmp_path), 30, ("logreg", "mlp"), classifier_epochs=2,
                              inception_weights=WEIGHTS)
    result = report.run(config, str(tmp_path))
    saved = json.load(open(tmp_path / "eval" / "report_step2.json"))
    assert saved["step"] == 2 and saved["num_samples"] == 30
    assert np.isfinite(saved["fid"]) and saved["fid"] > 0
    assert set(saved["classifiers"]) == {"logreg", "mlp"}
    for r in saved["classifiers"].values():
        assert 0.0 <= r["test_acc"] <= 1.0
    assert saved["privacy"]["steps"] == 2 and 0 < saved["privacy"]["epsilon_spent"] < 10
    assert saved["privacy"]["epsilon_spent_pld"] <= saved["privacy"]["epsilon_spent"]
    assert "PRIVATE training set" in saved["outside_dp_guarantee"]["fid"]
    assert result["fid"] == saved["fid"]


def test_eval_without_inception_reports_label_accuracy_and_classifiers(tmp_path):
    """eval.fid / eval.kid off: no Inception features, the cheap CPU metrics still reported."""
    config = trained_tiny_run(str(tmp_path), 12, ("logreg",), classifier_epochs=1, label_classifier_epochs=1,
                              fid=False, kid=False, inception_weights="/nonexistent/inception.npz")  # never opened
    report.run(config, str(tmp_path))
    saved = json.load(open(tmp_path / "eval" / "report_step2.json"))
    assert saved["fid"] is None and saved["fid_skipped"] == "eval.fid=False" and "kid" not in saved
    acc = saved["label_accuracy"]
    assert acc["num_samples"] == 12 and acc["per_class_counts"] == [4, 4, 4]
    assert 0.0 <= acc["overall"] <= 1.0
    assert 0.0 <= saved["classifiers"]["logreg"]["test_acc"] <= 1.0


def test_missing_inception_weights_skip_fid_and_kid_not_the_eval(tmp_path):
    """eval.fid / eval.kid on but no converted weights: both reported as skipped with the reason."""
    config = trained_tiny_run(str(tmp_path), 12, ("logreg",), classifier_epochs=1, label_classifier_epochs=1,
                              inception_weights="/nonexistent/inception.npz")
    assert config.eval.fid and config.eval.kid
    report.run(config, str(tmp_path))
    saved = json.load(open(tmp_path / "eval" / "report_step2.json"))
    assert saved["fid"] is None and "/nonexistent/inception.npz" in saved["fid_error"]
    assert saved["kid"] is None and "/nonexistent/inception.npz" in saved["kid_error"]
    assert 0.0 <= saved["label_accuracy"]["overall"] <= 1.0
    assert 0.0 <= saved["classifiers"]["logreg"]["test_acc"] <= 1.0
