"""The ``export`` settings (validated at load), which destinations a series' results go to, and the kinds of
result each takes."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
from pydicom import uid

from gateway.config import DEFAULT_SEND, DimseDestination, ExportSettings, StowDestination, get_settings
from gateway.export.destinations import LABEL_MAP_SEGMENTATION_STORAGE, destinations_for, for_models, output_kind

DESTINATIONS = {
    "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
    "vna": {"stow_url": "https://vna.example.org/dicom-web/studies", "token": "s3cret"},
    "ris": {"ae_title": "RIS", "host": "ris.example.org", "port": 11112},
}


def export(**values: object) -> ExportSettings:
    return ExportSettings(**{"destinations": DESTINATIONS, **values})  # type: ignore[arg-type]


def test_destination_kinds_are_told_apart_and_the_token_is_kept_secret() -> None:
    settings = export()
    assert isinstance(settings.destinations["pacs"], DimseDestination)
    vna = settings.destinations["vna"]
    assert isinstance(vna, StowDestination)
    assert vna.token is not None and vna.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


def test_defaults() -> None:
    settings = ExportSettings()
    assert settings.destinations == {} and settings.default == [] and settings.return_to_sender == {}
    assert (settings.max_attempts, settings.backoff_initial_s, settings.backoff_max_s) == (None, 2.0, 600.0)
    assert (settings.give_up_after_s, settings.check_interval_s, settings.unmapped) == (86400.0, 60.0, "default")
    assert (settings.workers, settings.poll_s, settings.calling_ae_title) == (2, 1.0, "GATEWAY")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"default": ["nowhere"]}, "unknown destination.*'nowhere'"),
        ({"return_to_sender": {"CT1": "elsewhere"}}, "unknown destination.*'elsewhere'"),
        ({"destinations": {"bad name": DESTINATIONS["pacs"]}}, "destination names must match"),
        ({"destinations": {"x": {"ae_title": "X", "host": "h", "port": 0}}}, "port"),
        ({"destinations": {"x": {"ae_title": "X" * 17, "host": "h", "port": 1}}}, "ae_title"),
        ({"destinations": {"x": {"stow_url": "ftp://h/studies"}}}, "stow_url"),
        ({"destinations": {"x": {"stow_url": "http://h/s", "ae_title": "X"}}}, "ae_title"),
        ({"backoff_initial_s": 10, "backoff_max_s": 5}, "backoff_max_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"destinations": {"x": {**DESTINATIONS["pacs"], "send": ["segmentation"]}}}, "send"),
        ({"destinations": {"x": {**DESTINATIONS["vna"], "send": []}}}, "send"),
    ],
)
def test_invalid_settings_name_the_problem(values: dict[str, object], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        export(**values)


def test_client_certificate_needs_its_key(tmp_path: Path) -> None:
    tls = {"ca_bundle": tmp_path / "ca.pem", "certificate": tmp_path / "client.pem"}
    with pytest.raises(pydantic.ValidationError, match="certificate and private_key go together"):
        export(destinations={"x": {**DESTINATIONS["pacs"], "tls": tls}})


def test_yaml_section(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "export:\n"
        "  destinations:\n"
        "    pacs: {ae_title: PACS, host: pacs.example.org, port: 104, tls: {ca_bundle: /etc/ca.pem},\n"
        "           send: [seg, sr, gsps]}\n"
        "    vna: {stow_url: 'http://127.0.0.1:8042/dicom-web/studies'}\n"
        "  return_to_sender: {CT1: pacs}\n"
        "  default: [vna]\n"
        "  max_attempts: 3\n"
    )
    settings = get_settings(config).export
    pacs = settings.destinations["pacs"]
    assert isinstance(pacs, DimseDestination) and pacs.tls is not None and pacs.tls.ca_bundle == Path("/etc/ca.pem")
    assert settings.max_attempts == 3 and settings.default == ["vna"]
    assert pacs.send == ["seg", "sr", "gsps"] and settings.destinations["vna"].send == list(DEFAULT_SEND)


def test_destinations_for_a_source() -> None:
    settings = export(return_to_sender={"CT1": "pacs", "MR1": "vna"}, default=["vna", "ris"])
    assert list(destinations_for(settings, "dimse:CT1")) == ["pacs", "vna", "ris"]
    assert list(destinations_for(settings, "dimse:MR1")) == ["vna", "ris"], "each destination once"
    assert list(destinations_for(settings, "dimse:OTHER")) == ["vna", "ris"]
    assert list(destinations_for(settings, "stow")) == ["vna", "ris"]
    assert destinations_for(export(), "dimse:CT1") == {}
    assert list(destinations_for(export(return_to_sender={"CT1": "pacs"}), "dimse:CT1")) == ["pacs"]


def test_an_unmapped_caller_goes_where_export_unmapped_says() -> None:
    values = {"return_to_sender": {"CT1": "pacs"}, "default": ["vna"]}
    default = destinations_for(export(**values), "dimse:OTHER")
    assert list(default) == ["vna"] and default.reason == "" and default.held_caller is None

    dropped = destinations_for(export(**values, unmapped="drop"), "dimse:OTHER")
    assert dropped == {} and dropped.held_caller is None
    assert dropped.reason == "dropped: caller 'OTHER' is not mapped in export.return_to_sender (unmapped: drop)"

    held = destinations_for(export(**values, unmapped="hold"), "dimse:OTHER")
    assert held == {} and held.held_caller == "OTHER" and held.reason.startswith("held: caller 'OTHER' is not mapped")
    assert "\n" not in held.reason

    for unmapped in ("drop", "hold"):
        settings = export(**values, unmapped=unmapped)
        assert list(destinations_for(settings, "dimse:CT1")) == ["pacs", "vna"], "a mapped caller is not affected"
        assert list(destinations_for(settings, "stow")) == ["vna"], "STOW-RS input has no caller: the defaults"

    nowhere = destinations_for(export(return_to_sender={"CT1": "pacs"}), "dimse:OTHER")
    assert nowhere == {} and nowhere.reason == "no destination configured: caller 'OTHER' is not mapped and " + (
        "export.default is empty"
    )
    assert destinations_for(ExportSettings(), "stow").reason == "no destination configured"


def test_destinations_for_a_source_come_with_the_kinds_each_takes() -> None:
    destinations = {**DESTINATIONS, "pacs": {**DESTINATIONS["pacs"], "send": ["seg", "sr", "seg"]}}
    settings = export(destinations=destinations, return_to_sender={"CT1": "pacs"}, default=["vna"])
    assert destinations_for(settings, "dimse:CT1") == {
        "pacs": frozenset({"seg", "sr"}),
        "vna": frozenset(DEFAULT_SEND),
    }
    assert "sc" not in DEFAULT_SEND, "burned-in key images only where a destination asks for them"


@pytest.mark.parametrize(
    ("sop_class", "kind"),
    [
        (uid.SegmentationStorage, "seg"),
        (LABEL_MAP_SEGMENTATION_STORAGE, "seg"),
        (uid.Comprehensive3DSRStorage, "sr"),
        (uid.ComprehensiveSRStorage, "sr"),
        (uid.EnhancedSRStorage, "sr"),
        (uid.BasicTextSRStorage, "sr"),
        (uid.KeyObjectSelectionDocumentStorage, "ko"),
        (uid.ParametricMapStorage, "pm"),
        (uid.GrayscaleSoftcopyPresentationStateStorage, "gsps"),
        (uid.SecondaryCaptureImageStorage, "sc"),
        (uid.MultiFrameSingleBitSecondaryCaptureImageStorage, "sc"),
        (uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage, "sc"),
        (uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage, "sc"),
        (uid.MultiFrameTrueColorSecondaryCaptureImageStorage, "sc"),
        (uid.CTImageStorage, None),
        (uid.ColorSoftcopyPresentationStateStorage, None),
        (uid.XRayRadiationDoseSRStorage, None),
        ("1.2.3.4", None),
    ],
)
def test_output_kind_of_a_sop_class(sop_class: str, kind: str | None) -> None:
    assert output_kind(sop_class) == kind
    assert output_kind(sop_class + "\0") == kind, "a UID padded to even length as read from a file"


def test_a_research_destination_may_take_only_some_models_jobs() -> None:
    research = {"host": "127.0.0.1", "port": 104, "ae_title": "RESEARCH"}
    settings = export(
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            "nodules": {**research, "deidentify": {"models": ["ct-nodule-unet"]}},
            "everything": {**research, "deidentify": {}},
        },
        default=["pacs", "nodules", "everything"],
    )
    routing = destinations_for(settings, "stow")
    assert routing.with_inputs == {"nodules", "everything"}
    ran_it = for_models(routing, settings, {"ct-nodule-unet", "ct-tissue"})
    assert list(ran_it) == ["pacs", "nodules", "everything"] and ran_it.with_inputs == {"nodules", "everything"}
    other = for_models(routing, settings, {"ct-tissue"})
    assert list(other) == ["pacs", "everything"] and other.with_inputs == {"everything"}, "not the nodule model's job"
    only_research = export(destinations={"nodules": settings.destinations["nodules"]}, default=["nodules"])
    none = for_models(destinations_for(only_research, "stow"), only_research, {"ct-tissue"})
    assert not none and "other models' jobs only" in none.reason
    with pytest.raises(pydantic.ValidationError, match="models"):
        export(destinations={"r": {**research, "deidentify": {"models": []}}})
