"""MEG policy: constrained MDP, CVPO and baselines."""
