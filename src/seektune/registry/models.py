"""The registry's tables (SQLAlchemy ORM), as the migrations in `migrations/versions/` create them.

A registered model is a name (`legal-qa`); each thing a run produces under that name is a version: the
trained adapter or full model (`1.2.0`), and each model the compression chain derived from it, as a build
of the same release (`1.2.0+merged`, `1.2.0+int8`). A version records where it came from (base model,
method, resolved config, data fingerprint, parent version, environment, run, who and when), how good it
is (its evaluations) and where its files are (artefact folder, a sha256 manifest of every file). Stages
and tags belong to the version; every stage change is kept in `stage_transitions`.

A change to these classes comes with a new migration (`tests/registry/test_migrations.py` compares the
migrated schema with them).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The newest migration; a database at another revision is upgraded (older) or refused (newer).
HEAD_REVISION = "0001"

STAGES = ("none", "staging", "production", "archived")
# What a version's artefact is: what training made, or which compression step derived it.
KINDS = ("adapter", "full", "merged", "distilled", "pruned", "qat", "gguf", "quantised")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class RegisteredModel(Base):
    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
        # One production version per name, kept by the database too where it has partial indexes.
        Index(
            "ix_model_versions_one_production",
            "model_id",
            unique=True,
            sqlite_where=text("stage = 'production'"),
            postgresql_where=text("stage = 'production'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"), index=True)
    version: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    method: Mapped[str | None] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16), default="none")
    base_model: Mapped[str | None] = mapped_column(Text)
    base_revision: Mapped[str | None] = mapped_column(String(128))
    base_fingerprint: Mapped[str | None] = mapped_column(String(80))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), index=True)
    config_yaml: Mapped[str | None] = mapped_column(Text)
    data_fingerprint: Mapped[str | None] = mapped_column(String(80))
    data_report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    environment: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    artefact_path: Mapped[str] = mapped_column(Text)
    artefact_source: Mapped[str | None] = mapped_column(Text)
    artefact_sha256: Mapped[str] = mapped_column(String(64))
    artefact_bytes: Mapped[int] = mapped_column(BigInteger)
    artefact_files: Mapped[dict[str, Any]] = mapped_column(JSON)
    artefact_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    run_dir: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    model: Mapped[RegisteredModel] = relationship(back_populates="versions")
    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])
    tags: Mapped[list[VersionTag]] = relationship(back_populates="version", cascade="all, delete-orphan")
    evaluations: Mapped[list[Evaluation]] = relationship(
        back_populates="version", cascade="all, delete-orphan", order_by="Evaluation.id"
    )
    transitions: Mapped[list[StageTransition]] = relationship(
        back_populates="version", cascade="all, delete-orphan", order_by="StageTransition.id"
    )

    @property
    def ref(self) -> str:
        """`name@version`, how the CLI and the server name it."""
        return f"{self.model.name}@{self.version}"


class VersionTag(Base):
    __tablename__ = "version_tags"
    # A tag names one version of a name, so `NAME@TAG` is unambiguous.
    __table_args__ = (UniqueConstraint("model_id", "tag", name="uq_version_tags_model_tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    tag: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    version: Mapped[ModelVersion] = relationship(back_populates="tags")


class StageTransition(Base):
    __tablename__ = "stage_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    from_stage: Mapped[str] = mapped_column(String(16))
    to_stage: Mapped[str] = mapped_column(String(16))
    changed_by: Mapped[str] = mapped_column(String(128))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    reason: Mapped[str | None] = mapped_column(Text)

    version: Mapped[ModelVersion] = relationship(back_populates="transitions")


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    source: Mapped[str] = mapped_column(String(32))  # run, eval, compress
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    data_fingerprint: Mapped[str | None] = mapped_column(String(80))
    run_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    version: Mapped[ModelVersion] = relationship(back_populates="evaluations")
