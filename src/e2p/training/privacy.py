"""Differential privacy for training, per user (DP-SGD through Opacus), and the numbers an audit needs.

The unit of privacy is a *user*: two training sets are neighbours when they differ by all the examples of one
user. Each step samples users (Poisson, each training user independently with probability q), computes each
sampled user's whole gradient contribution (the mean per-token loss over up to `examples_per_user` of that user's
examples, one backward pass per user), clips it to norm C, sums, adds Gaussian noise of standard deviation
sigma * C and divides by the expected number of users per step (Opacus's `DPOptimizer` does the clipping, noise
and scaling from the per-user gradients e2p hands it). sigma is calibrated with Opacus's `get_noise_multiplier`
for the target epsilon over every planned DP step of the run, and the (epsilon, delta) actually spent is
computed by Opacus's RDP accountant from the steps actually taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import E2PError

ACCOUNTANT = "rdp"


class PrivacyError(E2PError):
    """A differential-privacy setting that cannot give the guarantee asked for."""


@dataclass
class DPPlan:
    """What every DP step of a run uses: the noise multiplier sigma, the clipping norm C (max_grad_norm), the
    users' sampling rate q, the expected users per step, and at most this many examples per sampled user."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_users: float
    examples_per_user: int
    seed: int = 0


def check_epsilon_delta(epsilon: float | None, delta: float | None) -> None:
    """The checks that need no data: epsilon positive and finite, delta in (0, 1)."""
    if epsilon is None:
        if delta is not None:
            raise PrivacyError("--dp-delta needs --dp-epsilon: give the privacy budget epsilon too (e.g. --dp-epsilon 4)")
        return
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise PrivacyError(f"--dp-epsilon {epsilon}: epsilon must be a positive number (e.g. 1, 4 or 16; smaller is "
                           "more private); leave the flag out to train without differential privacy")
    if delta is not None and not 0 < delta < 1:
        raise PrivacyError(f"--dp-delta {delta}: delta must lie in (0, 1 / number of training users); leave it out "
                           "for the default 1 / (10 x training users)")


def resolve_delta(epsilon: float, delta: float | None, n_users: int) -> float:
    """The delta a run uses: the given one, or 1 / (10 n); refuses one at or above 1 / n, which would allow
    releasing a whole user's data with probability delta."""
    check_epsilon_delta(epsilon, delta)
    if n_users < 1:
        raise PrivacyError("differential privacy needs at least one training user")
    if delta is None:
        return 1.0 / (10 * n_users)
    if delta >= 1.0 / n_users:
        raise PrivacyError(f"--dp-delta {delta} is at or above 1 / {n_users} training users ({1 / n_users:.3g}): a "
                           f"delta that large lets a run expose a whole user; give a smaller one (e.g. "
                           f"{1 / (10 * n_users):.3g}) or leave it out for that default")
    return float(delta)


def plan(epsilon: float, delta: float, n_users: int, users_per_step: int, steps: int, max_grad_norm: float = 1.0,
         examples_per_user: int = 4, seed: int = 0) -> DPPlan:
    """sigma for (epsilon, delta) over `steps` DP steps sampling each of `n_users` users with probability
    q = users_per_step / n_users (Opacus's `get_noise_multiplier`, RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    q = min(1.0, users_per_step / n_users)
    try:
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=max(steps, 1),
                                     accountant=ACCOUNTANT)
    except ValueError as exc:
        raise PrivacyError(f"epsilon {epsilon} with delta {delta:.3g} over {steps} steps cannot be reached ({exc}): "
                           "give a larger --dp-epsilon or fewer --steps") from exc
    return DPPlan(float(sigma), max_grad_norm, q, q * n_users, examples_per_user, seed)


def spent(p: DPPlan, steps: int, delta: float) -> float:
    """The epsilon `steps` DP steps of plan `p` spent at `delta` (Opacus's RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if steps <= 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(p.noise_multiplier, p.sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def sample_users(n_users: int, q: float, seed: int, step: int) -> np.ndarray:
    """Poisson sampling: each user index independently with probability q (fixed by seed and step)."""
    rng = np.random.default_rng([seed, 7919, step])
    return np.flatnonzero(rng.random(n_users) < q)


# --- membership inference ---------------------------------------------------------------------------------------
