"""The names of the exit policies and training objectives, and the tables that map each name to its class.

Torch-free, so that the config can check a name without importing what implements it: a checkpoint's config also
loads alone, with `trust_remote_code`, where only its own imports are present. `exit_policies` and `objectives`
fill the tables with their built-ins; `register_exit_policy` and `register_training_objective` add a user's own.
"""

# The built-in names, known before (and without) importing the modules that implement them.
BUILTIN_EXIT_POLICIES = ("de3", "entropy", "max_prob", "energy", "patience", "patient_confident", "learned", "oracle")
BUILTIN_TRAINING_OBJECTIVES = ("de3", "cosee", "mpee")

EXIT_POLICIES: dict[str, type] = {}
TRAINING_OBJECTIVES: dict[str, type] = {}


def exit_policy_names() -> list[str]:
    """Every name `early_exit_policy` / `predict_early(policy=...)` accepts: the built-ins and the registered ones."""
    return sorted(set(BUILTIN_EXIT_POLICIES) | set(EXIT_POLICIES))


def training_objective_names() -> list[str]:
    """Every name `training_objective` accepts: the built-ins and the registered ones."""
    return sorted(set(BUILTIN_TRAINING_OBJECTIVES) | set(TRAINING_OBJECTIVES))


__all__ = [
    "BUILTIN_EXIT_POLICIES",
    "BUILTIN_TRAINING_OBJECTIVES",
    "EXIT_POLICIES",
    "TRAINING_OBJECTIVES",
    "exit_policy_names",
    "training_objective_names",
]
