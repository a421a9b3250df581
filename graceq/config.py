"""Campaign settings: one TOML file, validated by pydantic before any work starts.

Every energy in the settings is in the campaign's unit (``campaign.unit``); the window is per
molecule, as CSP papers quote it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A settings file or value that cannot run; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CampaignSection(_Section):
    pool: str = Field(description="generation pool: extxyz/ASE-readable file, VASP directory or ASE .db")
    unit: str = Field("kJ/mol", description="unit of every energy in the pool and the settings")
    window: float = Field(5.0, description="energy window above the best structure, per molecule, in `unit`")
    n_init: int = Field(20, ge=2, description="structures in the farthest-point initial batch")
    n_batch: int | None = Field(
        None, ge=1, description="structures per Kriging-Believer batch (default: by pool size, see batch_size)"
    )
    stop_rule: Literal["risk", "p_conv"] = Field(
        "risk", description='"risk": stop when the stated risk is at most `risk`; "p_conv": the seed\'s rule '
        "(stop when p_conv reaches `p_conv_target`), kept to reproduce the published method",
    )
    risk: float = Field(
        0.05, gt=0.0, lt=1.0, description="stop when the expected number of window structures still "
        "unmeasured, which bounds P(at least one is missed), is at most this (stop_rule = \"risk\")",
    )
    risk_confidence: float = Field(
        0.95, ge=0.0, lt=1.0, description="confidence in the law of the model's errors behind the stated risk: "
        "the risk is the largest over every error law the campaign's prospective errors leave plausible at "
        "this confidence (0: the maximum-likelihood law alone)",
    )
    error_law: Literal["spread_and_noise", "spread_noise_height", "spread"] = Field(
        "spread_and_noise", description='the law of the model\'s errors behind the stated risk: '
        '"spread_and_noise": a t law of scale sqrt((k spread)^2 + noise^2), the committee\'s spread plus an '
        'error no member learns, both fitted to the prospective errors; "spread_noise_height": the same with '
        "a noise that may also grow with the force-field height h above the pool's minimum, "
        'sqrt(noise^2 + (kappa h)^2), kappa fitted (0 when the errors do not show it); "spread": scale k '
        "spread alone (the rule before 2026-12-07, kept to reproduce it)",
    )
    p_conv_target: float = Field(0.99, gt=0.0, le=1.0, description='stop when p_conv reaches this (stop_rule = "p_conv")')
    acquisition: Literal["p_window", "ei", "greedy"] = Field(
        "p_window", description='"p_window": each batch the structures most likely to lie in the window, by the '
        "committee, or by its mean or the force field when the measurements show them to forecast better "
        "(`graceq status` says which ranks: `ranking`; `forecaster` in `summary.json`'s iterations); "
        '"ei": Expected Improvement with a Kriging-Believer batch (the seed\'s recipe); "greedy": the lowest '
        "predicted energies",
    )
    trim_last_batch: bool = Field(
        True, description='batch mode, stop_rule = "risk": send no more of a batch than the stop needs, the '
        "picks up to the first after which the stated risk of the structures left, if the picks come back as "
        "predicted, is at most `risk` (the picks after it would find at most `risk` window structures "
        "between them); false: always full batches (fewer rounds, more calls)",
    )
    budget: int = Field(0, ge=0, description="most reference calls (0: the whole pool)")
    mode: Literal["batch", "async"] = Field(
        "batch", description='"batch": synchronous rounds (send a batch, wait for all of it, refit, decide); '
        '"async": keep `slots` reference jobs in flight and decide after every result',
    )
    slots: int = Field(8, ge=1, description="reference jobs kept in flight in async mode")
    refit_every: int = Field(
        0, ge=0, description="async mode: results between two full refits of the committee (0: `slots`); "
        "also the length of one iteration for `graceq run --max-iterations`",
    )
    cancel_on_stop: bool = Field(
        False, description="async mode: when the stopping rule fires, cancel the reference jobs still running "
        "(each is recorded as a failed result, \"cancelled\") instead of waiting for them and recording their "
        "results. Jobs an engine's scheduler holds (submit/poll) are waited for; a budget stop always waits, "
        "and states the risk again once they have landed",
    )
    seed: int = Field(0, description="seed of every random choice (committee subsets)")
    energy_key: str = Field("energy_ff", description="key of the force-field energy (total per cell, in `unit`) "
                            "in the pool file, database or CSV")
    name_key: str = Field("name", description="key of the structure name in the pool (read as text: '007' stays '007')")
    energies_csv: str | None = Field(None, description="CSV name,energy_ff for a VASP directory pool")
    atoms_per_molecule: int | None = Field(None, ge=1, description="atoms per molecule (default: detected)")
    on_bad_molecule: Literal["error", "skip"] = Field(
        "error", description="a structure not made of the pool's molecule: stop (error) or drop it (skip; "
        "listed in the campaign's dropped.csv)")

    @field_validator("window")
    @classmethod
    def _positive_window(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"the energy window must be > 0, got {value}")
        if not math.isfinite(value):  # EI's target, the stop rule and the plots' axes need a number
            raise ValueError(f"the energy window must be a finite energy per molecule (e.g. 5.0), got {value}")
        return value

    @field_validator("unit")
    @classmethod
    def _known_unit(cls, value: str) -> str:
        from graceq.units import check_unit

        return check_unit(value)


def batch_size(n_batch: int | None, n_pool: int) -> int:
    """The batch size a campaign uses: the setting, or DESIGN.md's default for the pool's size.

    100 for pools of 2,000 structures or more, 50 from 500; a smaller pool gets one twentieth of
    its size (at least 5), so that a 264-structure landscape is not exhausted in five batches.
    """
    if n_batch is not None:
        return n_batch
    if n_pool >= 2000:
        return 100
    if n_pool >= 500:
        return 50
    return max(5, n_pool // 20)


class DescriptorSection(_Section):
    n_max: int = Field(14, ge=1, description="radial functions of the SOAP density expansion, before compression")
    l_max: int = Field(9, ge=0, description="largest angular channel of the SOAP expansion")
    cutoff: float = Field(4.5, gt=0, description="cutoff radius of the atom-centred density, Å")
    smoothing: float = Field(0.5, ge=0, description="width of the cutoff's smooth step, Å")
    gaussian_width: float = Field(0.3, gt=0, description="width of the Gaussian on each neighbour, Å")
    scaling_rate: float = Field(1.0, description="rate of the radial scaling of Willatt et al. (2018)")
    scaling_scale: float = Field(3.5, description="scale of the radial scaling of Willatt et al. (2018), Å")
    scaling_exponent: float = Field(2.0, description="exponent of the radial scaling of Willatt et al. (2018)")
    n_compressed: int = Field(5, ge=1, description="radial functions kept per species and angular channel "
                              "by the optimal radial basis (Goscinski et al. 2021)")
    fit_sample: int = Field(200, ge=1, description="structures used to fit the radial compression")
    chunk_size: int = Field(32, ge=1, description="structures per featurize task")


class ModelSection(_Section):
    n_members: int = Field(256, ge=4, description="ridge models in the resampling committee")
    subsample: float = Field(0.5, gt=0, le=1, description="fraction of the train set each member is fitted on")
    cv: int = Field(5, ge=2, description="folds of the cross-validation that chooses the ridge lambda")
    alphas: list[float] = Field(default_factory=lambda: [10.0**k for k in range(-10, 2)],
                                description="ridge lambdas the cross-validation chooses from")
    train_fraction: float = Field(0.8, gt=0, lt=1, description="oldest fraction of the labelled structures "
                                  "that trains the committee; the newest rest calibrates it")
    members_per_task: int = Field(64, ge=1, description="committee members fitted by one fit task")
    force_field_feature: bool = Field(False, description="the force-field energy is one more input of the delta "
                                      "model besides the descriptor (for a force field whose energy scale is off; "
                                      "benchmarks/README.md has what it changes)")


class EngineSection(_Section):
    model_config = ConfigDict(extra="allow")
    engine: str = Field("replay", description='"replay", "ase", "slurm", or "package.module:EngineClass"')


class RuntimeSection(_Section):
    workers: int = Field(2, ge=1, description="embedded worker processes started by `graceq run`")
    lease_timeout: float = Field(90.0, gt=0, description="s without a heartbeat before a job counts as lost")
    resend_unstarted_after: float = Field(
        3600.0, gt=0, description="s a job may wait in the queue before it is sent again"
    )
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it counts as failed")
    poll_interval: float = Field(0.2, gt=0, description="s between looks at the result files")
    send_retry_for: float = Field(
        900.0, gt=0, description="s a send keeps retrying (with backoff) while the broker cannot be reached",
    )


class Settings(_Section):
    campaign: CampaignSection
    descriptor: DescriptorSection = DescriptorSection()
    model: ModelSection = ModelSection()
    engine: EngineSection = EngineSection()
    runtime: RuntimeSection = RuntimeSection()

    def to_toml_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (None values dropped, since TOML has no null)."""
        return _drop_none(self.model_dump())


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def load_settings(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Settings from a TOML file (relative pool paths resolved against the file's folder)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); "
                          "save the settings as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    settings = settings_from_dict(data, source=str(path))
    pool = Path(settings.campaign.pool).expanduser()
    if not pool.is_absolute():
        try:
            settings.campaign.pool = str((path.parent / pool).resolve())
        except (RuntimeError, OSError):  # a loop of symbolic links: graceq.pool.read_pool says so
            settings.campaign.pool = str(Path(os.path.abspath(path.parent / pool)))
    return settings


def _unknown_key(loc: tuple) -> str:
    """'[campaign] n_int is not a setting; did you mean n_init? Valid keys: ...' (difflib)."""
    import difflib

    model, where = Settings, []
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
        where.append(str(part))
    key = str(loc[-1])
    valid = list(model.model_fields)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    section = f"[{'.'.join(where)}] " if where else "top level: "
    kind = "section" if not where else "setting"
    return (f"{section}{key!r} is not a {kind}"
            + (f"; did you mean {close[0]!r}?" if close else ".")
            + f" Valid {'sections' if not where else 'keys'}: {', '.join(valid)}")


def settings_from_dict(data: dict[str, Any], source: str = "<settings>") -> Settings:
    """Validated settings; a ConfigError names the source and every bad field."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            _unknown_key(tuple(err["loc"])) if err["type"] == "extra_forbidden"
            else f"[{'.'.join(str(p) for p in err['loc'])}] {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: invalid settings: {problems}") from None


def write_settings(settings: Settings, path: str | Path) -> None:
    """Write settings as TOML, so that the campaign directory holds what it ran with."""
    Path(path).write_text(tomli_w.dumps(settings.to_toml_dict()))
