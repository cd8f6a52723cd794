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
