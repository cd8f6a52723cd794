"""Every schema change of the registry, in order. Add new ones at the end; never edit one
that has shipped (sqlite-utils records each applied name in ``_sqlite_migrations``)."""

from sqlite_utils.migrations import Migrations

migrations = Migrations("recycle")


@migrations()
def m001_base_models_and_experts(db):
    db["base_models"].create(
        {
            "id": int,
            "name": str,  # alias, absolute folder path, or hub id
            "kind": str,  # alias | local | hub
            "config_hash": str,  # sha256 of config.json (None for an unresolved hub id)
            "created": str,
        },
        pk="id",
        not_null={"name", "kind", "created"},
    )
    db["base_models"].create_index(["name", "config_hash"], unique=True)
    db["experts"].create(
        {
            "id": int,
            "name": str,
            "path": str,
            "sha256": str,
            "base_model_id": int,
            "peft_type": str,
            "rank": int,  # r
            "ranks": str,  # JSON {module: rank} where rank_pattern differs from r
            "alpha": float,
            "use_rslora": int,
            "target_modules": str,  # JSON list of the adapted module paths
            "n_params": int,
            "task": str,
            "dataset": str,
            "created": str,
            "meta": str,  # JSON object
        },
        pk="id",
        foreign_keys=[("base_model_id", "base_models", "id")],
        not_null={"name", "path", "sha256", "base_model_id", "peft_type", "created"},
    )
    db["experts"].create_index(["name"], unique=True)
    db["experts"].create_index(["sha256"])


# --- later migrations go below, in the order they were written ---


@migrations()
def m002_tasks(db):
    db["tasks"].create(
        {
            "id": int,
            "name": str,
            "kind": str,  # classification | generation
            "description": str,
            "source": str,  # human-readable source identity
            "dataset": str,  # what experts trained on it record as their data set
            "spec": str,  # JSON of the checked spec (absolute paths)
            "spec_sha256": str,
            "n_choices": int,  # None for generation or per-example choices
            "n_train": int,
            "n_validation": int,
            "n_test": int,
            "created": str,
        },
        pk="id",
        not_null={"name", "kind", "source", "spec", "spec_sha256", "created"},
    )
    db["tasks"].create_index(["name"], unique=True)


@migrations()
def m003_gates(db):
    # PHATGOOSE gates trained for an expert: one row per (expert, settings, adapter content).
    db["gates"].create(
        {
            "id": int,
            "expert_id": int,
            "path": str,  # safetensors file, one vector per routed module
            "settings_hash": str,
            "settings": str,  # JSON of the settings hashed
            "adapter_sha256": str,  # the adapter weights the gates were trained with
            "steps": int,
            "loss_start": float,
            "loss_end": float,
            "seconds": float,
            "created": str,
        },
        pk="id",
        foreign_keys=[("expert_id", "experts", "id")],
        not_null={"expert_id", "path", "settings_hash", "settings", "adapter_sha256", "created"},
    )
    db["gates"].create_index(["expert_id", "settings_hash", "adapter_sha256"], unique=True)


@migrations()
def m004_compositions(db):
    # A named method over a set of experts (members pinned by adapter sha256).
    db["compositions"].create(
        {
            "id": int,
            "name": str,
            "method": str,
            "settings": str,  # JSON: top_k, weighting, temperature / expert
            "members": str,  # JSON list of {name, sha256}
            "base_model": str,
            "created": str,
        },
        pk="id",
        not_null={"name", "method", "settings", "members", "created"},
    )
    db["compositions"].create_index(["name"], unique=True)


@migrations()
def m005_evaluations(db):
    db["eval_runs"].create(
        {"id": int, "created": str, "settings": str, "status": str, "seconds": float},
        pk="id",
        not_null={"created", "settings", "status"},
    )
    # One row per (run, method or composition, task). ``key`` identifies the result
    # (settings hash with member hashes, base, task spec, n, seed): equal keys, equal results.
    db["eval_results"].create(
        {
            "id": int,
            "run_id": int,
            "key": str,
            "label": str,  # method or composition name
            "method": str,
            "settings_hash": str,
            "member_hashes": str,  # JSON {expert: sha256}
            "task": str,
            "held": str,  # in | out
            "n": int,
            "seed": int,
            "correct": int,
            "accuracy": float,
            "ci_low": float,
            "ci_high": float,
            "routing": str,  # JSON {module: {expert: share of tokens}}
            "predictions": str,  # JSON list of predicted choice indices
            "seconds": float,
            "reused_from": int,
            "created": str,
        },
        pk="id",
        foreign_keys=[("run_id", "eval_runs", "id")],
        not_null={"run_id", "key", "label", "method", "task", "held", "n", "created"},
    )
    db["eval_results"].create_index(["key"])
    db["eval_results"].create_index(["run_id"])


@migrations()
def m006_scores_and_state(db):
    # Per example: every choice's score and the gold label, so that ensembles, calibration
    # and paired tests are computed from stored results; "extra": method-specific numbers
    # (routing cost, gate probabilities).
    for column in ("scores", "labels", "extra"):
        db["eval_results"].add_column(column, str)
    # Who runs an evaluation, so that a later run can mark a killed one as dead.
    db["eval_runs"].add_column("pid", int)
    db["eval_runs"].add_column("host", str)
    # Trained parts of a composition (router parameters, a gate): {key: {path, sha256, ...}}.
    db["compositions"].add_column("state", str)


@migrations()
def m007_expert_files(db):
    # The adapter's config is part of its content (lora_alpha, rank_pattern change what it
    # computes): its hash, and both files' size and mtime for a cheap "unchanged" check
    # before hashing again.
    db["experts"].add_column("config_sha256", str)
    for column in ("weights_size", "weights_mtime_ns", "config_size", "config_mtime_ns"):
        db["experts"].add_column(column, int)


@migrations()
def m008_dtype_and_memory(db):
    # The dtype a result was computed in (None: float32, before dtypes existed) and the
    # peak memory of the Ray task that computed it (JSON {peak_rss_mib, rss_scope,
    # cuda_peak_mib}).
    for table in ("gates", "eval_results"):
        db[table].add_column("dtype", str)
        db[table].add_column("memory", str)
