"""Instance segmentation accuracy: one-to-one matching of predicted and true objects by IoU.

This is the matching behind the F1 scores that StarDist and the 2018 Data Science Bowl report: a
predicted object and a true object match when their intersection over union is at least a
threshold, each object matching at most one other (a maximum bipartite matching).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import maximum_bipartite_matching


@dataclass(frozen=True)
class Matching:
    """Result of matching predicted to true instances at one IoU threshold.

    Attributes
    ----------
    threshold : float
        Minimum IoU of a match.
    n_true, n_pred : int
        Number of true and predicted instances (label 0 is background).
    tp : int
        Matched pairs (true positives); ``n_pred - tp`` false positives, ``n_true - tp`` misses.
    """

    threshold: float
    n_true: int
    n_pred: int
    tp: int

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        """2 TP / (n_true + n_pred); 1.0 when both images are empty."""
        total = self.n_true + self.n_pred
        return 2 * self.tp / total if total else 1.0


def match_instances(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Matching:
    """Match the instances of two label images one-to-one at IoU >= ``threshold``.

    Parameters
    ----------
    true, pred : (Y, X) integer ndarray
        Label images of the same shape; 0 is background, ids need not be consecutive.
    threshold : float
        Minimum intersection over union of a matched pair, in (0, 1].

    Returns
    -------
    Matching
        Counts and F1. Uses a sparse overlap table, so it scales to whole slides of instances.
    """
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    if not 0 < threshold <= 1:
        raise ValueError(f"IoU threshold must be in (0, 1], got {threshold}")
    true_ids, true_index = np.unique(true, return_inverse=True)
    pred_ids, pred_index = np.unique(pred, return_inverse=True)
    overlap = sparse.coo_matrix(
        (np.ones(true.size, dtype=np.int64), (true_index.ravel(), pred_index.ravel())),
        shape=(true_ids.size, pred_ids.size)).tocsr()
    true_area = np.asarray(overlap.sum(axis=1)).ravel()
    pred_area = np.asarray(overlap.sum(axis=0)).ravel()
    pairs = overlap.tocoo()
    foreground = (true_ids[pairs.row] != 0) & (pred_ids[pairs.col] != 0)
    rows, cols, inter = pairs.row[foreground], pairs.col[foreground], pairs.data[foreground]
    iou = inter / (true_area[rows] + pred_area[cols] - inter)
    ok = iou >= threshold
    candidates = sparse.csr_matrix((np.ones(int(ok.sum())), (rows[ok], cols[ok])),
                                   shape=(true_ids.size, pred_ids.size))
    matched = maximum_bipartite_matching(candidates, perm_type="column")
    return Matching(threshold=threshold, n_true=int(np.count_nonzero(true_ids)),
                    n_pred=int(np.count_nonzero(pred_ids)), tp=int(np.count_nonzero(matched >= 0)))
