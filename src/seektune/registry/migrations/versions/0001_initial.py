"""The first registry schema: models, versions, tags, stage transitions, evaluations.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", _WHEN, nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("registered_models.id"), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=True),
        sa.Column("base_revision", sa.String(128), nullable=True),
        sa.Column("base_fingerprint", sa.String(80), nullable=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=True),
        sa.Column("config_yaml", sa.Text(), nullable=True),
        sa.Column("data_fingerprint", sa.String(80), nullable=True),
        sa.Column("data_report", sa.JSON(), nullable=True),
        sa.Column("environment", sa.JSON(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("artefact_path", sa.Text(), nullable=False),
        sa.Column("artefact_source", sa.Text(), nullable=True),
        sa.Column("artefact_sha256", sa.String(64), nullable=False),
        sa.Column("artefact_bytes", sa.BigInteger(), nullable=False),
        sa.Column("artefact_files", sa.JSON(), nullable=False),
        sa.Column("artefact_removed_at", _WHEN, nullable=True),
        sa.Column("run_dir", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
    )
    op.create_index("ix_model_versions_model_id", "model_versions", ["model_id"])
    op.create_index("ix_model_versions_parent_id", "model_versions", ["parent_id"])
    op.create_index(
        "ix_model_versions_one_production",
        "model_versions",
        ["model_id"],
        unique=True,
        sqlite_where=sa.text("stage = 'production'"),
        postgresql_where=sa.text("stage = 'production'"),
    )
    op.create_table(
        "version_tags",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("registered_models.id"), nullable=False),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.UniqueConstraint("model_id", "tag", name="uq_version_tags_model_tag"),
    )
    op.create_index("ix_version_tags_version_id", "version_tags", ["version_id"])
    op.create_table(
        "stage_transitions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("from_stage", sa.String(16), nullable=False),
        sa.Column("to_stage", sa.String(16), nullable=False),
        sa.Column("changed_by", sa.String(128), nullable=False),
        sa.Column("changed_at", _WHEN, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_stage_transitions_version_id", "stage_transitions", ["version_id"])
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("data_fingerprint", sa.String(80), nullable=True),
        sa.Column("run_dir", sa.Text(), nullable=True),
        sa.Column("created_at", _WHEN, nullable=False),
    )
    op.create_index("ix_evaluations_version_id", "evaluations", ["version_id"])


def downgrade() -> None:
    for table in ("evaluations", "stage_transitions", "version_tags", "model_versions", "registered_models"):
        op.drop_table(table)
