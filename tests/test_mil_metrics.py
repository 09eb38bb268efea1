"""The numpy metrics behind every bootstrap CI equal scikit-learn's definitions exactly.

They replaced sklearn calls inside the bootstrap loop (sklearn's input validation made the
1,000-resample CIs 80 % of a small train-mil run); sklearn stays the oracle here.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

from wsi_pipe.mil import metrics as M


def test_numpy_metrics_equal_sklearn_with_ties_absent_and_unpredicted_classes():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(600):
        k = int(rng.integers(2, 5))
        n = int(rng.integers(2, 25))
        y = rng.integers(0, k, n)
        p = rng.random((n, k))
        if trial % 3 == 0:  # many tied scores
            p = np.round(p, 1) + 0.01
        p /= p.sum(1, keepdims=True)
        pred = p.argmax(1)
        present = np.unique(y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about classes missing from y_pred
            if len(present) >= 2:
                if k == 2:
                    ref_auc = skm.roc_auc_score(y, p[:, 1])
                    ref_ap = skm.average_precision_score(y == 1, p[:, 1])
                else:
                    ref_auc = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in present])
                    ref_ap = np.mean(
                        [skm.average_precision_score(y == c, p[:, c]) for c in present]
                    )
                assert abs(M.auroc(y, p) - ref_auc) < 1e-12
                assert abs(M.auprc(y, p) - ref_ap) < 1e-12
                checked += 1
            assert abs(M.balanced_accuracy(y, p) - skm.balanced_accuracy_score(y, pred)) < 1e-12
            ref_f1 = (
                skm.f1_score(y, pred, pos_label=1, zero_division=0)
                if k == 2
                else skm.f1_score(y, pred, average="macro", labels=np.arange(k), zero_division=0)
            )
            assert abs(M.f1(y, p) - ref_f1) < 1e-12
    assert checked > 400
    # one class only: ranking metrics are undefined, not an error
    y1 = np.zeros(5, dtype=int)
    p1 = np.full((5, 2), 0.5)
    assert np.isnan(M.auroc(y1, p1)) and np.isnan(M.auprc(y1, p1))
