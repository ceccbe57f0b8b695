"""The results of a job for a radiologist: ``GET /ui/jobs/{id}/results`` and its overlay PNGs.

The page shows whose study it is (the patient's name and ID are on this page, as a radiologist needs them; they are
never logged), each model's TID 1500 report as a readable report (:mod:`gateway.ui.report`: findings, measurements
rounded with their units, QC comments, the intended use and the statement that no physician reviewed it), and an
overlay preview per finding (:mod:`gateway.ui.overlay`):

- a segment declared to hold lesions: one preview per lesion, on its key image (the source image its SR group
  cites, where its cross-section is largest; else the slice nearest its centre);
- any other segment: one preview on the slice where it is largest;
- a Parametric Map: one preview on its middle slice.

Each preview steps through the slices its segment or map touches, in anatomical order (htmx swaps the preview in
place: ``GET /ui/jobs/{id}/results/preview``; without JavaScript the links load the page with that slice). Then a
link opens the study in a DICOMweb viewer (``ui.viewer_url``, its ``{study}`` placeholder replaced by the
URL-encoded Study Instance UID), beside the gateway's DICOMweb root, which lists the job's outputs
(:mod:`gateway.api.qido`).

``GET /ui/jobs/{id}/overlay?output=N&segment=S&slice=K`` answers the PNG of slice ``K`` (an index into the output's
slices in anatomical order) of output ``N`` (an index into the job's outputs) with segment ``S`` outlined; a
parameter the output cannot answer is 400 with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from gateway.api.qido import dicomweb_base_url
from gateway.errors import NotFound
from gateway.infer.lesions import lesion_name
from gateway.jobs.views import JobSummary, job_summary
from gateway.store.index import Instance, Job, ModelVersion, Output, Study
from gateway.store.store import StoreIndex
from gateway.ui.errors import UI_PREFIX
from gateway.ui.overlay import Layout, Window, key_plane, nearest_plane, read_layout, render_png, run_around
from gateway.ui.report import Finding, Report, read_report
from gateway.ui.session import Viewer, require_ui
from gateway.ui.templating import render

__all__ = ["Patient", "Preview", "ResultsView", "image_numbers", "overlay_png", "preview_at", "results_view", "router"]


router = APIRouter(prefix=f"{UI_PREFIX}/jobs", include_in_schema=False)

Reader = Annotated[Viewer, Depends(require_ui("read"))]
_OVERLAID = frozenset({"SEG", "PM"})
_MAX_INDEX = 100_000


@dataclass(frozen=True)
class Patient:
    """Whose study it is, as the index holds it (shown on the page, never logged)."""

    name: str | None
    patient_id: str | None
    birth_date: str | None
    sex: str | None
    study_date: str | None
    accession_number: str | None
    study_description: str | None


@dataclass(frozen=True)
class Preview:
    """One overlay preview: which output, segment (and lesion) it shows, on which of the slices it touches."""

    output: int
    title: str
    kind: str
    segment: int | None
    lesion: int | None
    slices: tuple[int, ...]  # the slices (indices into the output's planes) it touches, in anatomical order
    slice: int
    key: int  # the key slice
    planes: tuple[str, ...] = ()  # the SOP Instance UID of the source image of each of the output's slices
    colour: str | None = None  # the segment's display colour (#rrggbb)
    facts: tuple[str, ...] = ()  # "2.7 ml", "18.6 mm": the finding's first measurements

    @property
    def anchor(self) -> str:
        """The preview's HTML id."""
        lesion = f"-l{self.lesion}" if self.lesion is not None else ""
        return f"preview-o{self.output}-s{self.segment or 0}{lesion}"

    @property
    def source(self) -> str:
        """The SOP Instance UID of the source image at :attr:`slice`."""
        return self.planes[self.slice] if 0 <= self.slice < len(self.planes) else ""

    @property
    def position(self) -> int:
        """1-based position of the slice among :attr:`slices` (0 when it is not one of them)."""
        return self.slices.index(self.slice) + 1 if self.slice in self.slices else 0

    @property
    def previous(self) -> int | None:
        """The touched slice before this one, if any."""
        before = [k for k in self.slices if k < self.slice]
        return before[-1] if before else None

    @property
    def next(self) -> int | None:
        """The touched slice after this one, if any."""
        after = [k for k in self.slices if k > self.slice]
        return after[0] if after else None

    def query(self, slice_: int) -> str:
        """The query string naming this preview at ``slice_``."""
        values: dict[str, int] = {"output": self.output}
        if self.segment is not None:
            values["segment"] = self.segment
        if self.lesion is not None:
            values["lesion"] = self.lesion
        values["slice"] = slice_
        return urlencode(values)


@dataclass(frozen=True)
class ModelResults:
    """One model's results: its report (if it wrote one) and its previews."""

    model: str
    report: Report | None
    previews: tuple[Preview, ...]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResultsView:
    """What the results page shows."""

    summary: JobSummary
    patient: Patient
    models: tuple[ModelResults, ...]
    purged_at: float | None
    viewer_link: str | None
    dicomweb_root: str


# --- the page's data ------------------------------------------------------------------------------------------


def results_view(store: StoreIndex, job_id: int, *, viewer_url: str | None, dicomweb_root: str) -> ResultsView:
    """Gather the results page's data: the reports and previews of each model that ran.

    Raises
    ------
    gateway.errors.NotFound
        If there is no job ``job_id``.
    """
    summary = job_summary(store, job_id)
    detail, patient = _job_detail(store, job_id)
    outputs = _outputs(store, detail)
    models = []
    for model in dict.fromkeys(str(o.get("model", "")) for o in detail.get("outputs") or ()):
        models.append(_model_results(model, outputs, _lesion_sets(detail, model)))
    purged = (detail.get("retention") or {}).get("outputs_purged_at")
    link = None
    if viewer_url:
        link = viewer_url.replace("{study}", quote(summary.study_instance_uid, safe=""))
    return ResultsView(summary, patient, tuple(models), purged, link, dicomweb_root)


@dataclass(frozen=True)
class _Output:
    index: int
    model: str
    kind: str
    path: Path


def _job_detail(store: StoreIndex, job_id: int) -> tuple[dict[str, Any], Patient]:
    with store.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        study = session.get(Study, job.study_instance_uid)
        detail = dict(job.detail or {})
    patient = Patient(
        name=_person_name(study.patient_name) if study else None,
        patient_id=study.patient_id if study else None,
        birth_date=_date(study.patient_birth_date) if study else None,
        sex=study.patient_sex if study else None,
        study_date=_date(study.study_date) if study else None,
        accession_number=study.accession_number if study else None,
        study_description=study.study_description if study else None,
    )
    return detail, patient


def _outputs(store: StoreIndex, detail: Mapping[str, Any]) -> list[_Output]:
    """The job's outputs with their files (as the index records them, else under ``outputs/``)."""
    listed = [o for o in detail.get("outputs") or () if isinstance(o, dict)]
    uids = [str(o.get("SOPInstanceUID", "")) for o in listed]
    with store.sessions() as session:
        rows = session.execute(select(Output.sop_instance_uid, Output.path).where(Output.sop_instance_uid.in_(uids)))
        paths = dict(rows.all())
    found = []
    for index, (item, uid) in enumerate(zip(listed, uids, strict=True)):
        relative = paths.get(uid) or f"outputs/{item.get('file', '')}"
        found.append(_Output(index, str(item.get("model", "")), str(item.get("kind", "")), store.data_dir / relative))
    return found


def _lesion_sets(detail: Mapping[str, Any], model: str) -> dict[str, list[dict[str, Any]]]:
    """Segment name -> its lesions (number, centre), as the job's inference recorded them for ``model``."""
    found: dict[str, list[dict[str, Any]]] = {}
    for result in (detail.get("inference") or {}).get("results") or ():
        if isinstance(result, dict) and result.get("model") == model:
            for lesion_set in result.get("lesions") or ():
                found[str(lesion_set.get("name"))] = list(lesion_set.get("lesions") or ())
    return found


def _model_results(model: str, outputs: Sequence[_Output], lesions: Mapping[str, list[dict[str, Any]]]) -> ModelResults:
    mine = [o for o in outputs if o.model == model]
    problems: list[str] = []
    report = None
    for output in (o for o in mine if o.kind == "SR"):
        try:
            report = read_report(output.path)
        except (OSError, ValueError) as exc:
            problems.append(f"The report cannot be read: {_reason(exc)}")
    previews: list[Preview] = []
    for output in (o for o in mine if o.kind in _OVERLAID):
        try:
            previews.extend(_previews(output, report, lesions))
        except (OSError, ValueError) as exc:
            problems.append(f"No preview of the {output.kind} (output {output.index}): {_reason(exc)}")
    return ModelResults(model, report, tuple(previews), tuple(problems))


def _previews(output: _Output, report: Report | None, lesions: Mapping[str, list[dict[str, Any]]]) -> list[Preview]:
    layout = read_layout(output.path)
    uids = tuple(plane.sop_instance_uid for plane in layout.planes)
    if layout.kind == "PM":
        touched = layout.touched()
        key = touched[len(touched) // 2]
        return [Preview(output.index, layout.map_label or "parametric map", "PM", None, None, touched, key, key, uids)]
    previews = []
    for number, segment in sorted(layout.segments.items()):
        touched = layout.touched(number)
        if not touched:
            continue
        found = lesions.get(segment.label) or ()
        base = Preview(output.index, segment.label, "SEG", number, None, touched, touched[0], touched[0], uids)
        base = replace(base, colour=segment.hex)
        if not found:
            key = key_plane(layout, output.path, number)
            facts = _facts(_finding(report, segment.label))
            previews.append(replace(base, slice=key, key=key, facts=facts))
        for lesion in found:
            name = lesion_name(segment.label, int(lesion.get("number", 0)))
            finding = _finding(report, name)
            key = _lesion_key(layout, finding, lesion.get("centre"), touched)
            slices = run_around(layout, touched, key)  # its own slices, not those of the segment's other lesions
            facts = _facts(finding)
            number = int(lesion.get("number", 0))
            previews.append(replace(base, title=name, lesion=number, slices=slices, slice=key, key=key, facts=facts))
    return previews


def image_numbers(store: StoreIndex, previews: Iterable[Preview]) -> dict[str, int]:
    """Instance Number of the source image each preview shows now, by SOP Instance UID (as the index holds it)."""
    uids = {p.source for p in previews}
    with store.sessions() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.instance_number).where(Instance.sop_instance_uid.in_(uids))
        ).all()
    return {uid: number for uid, number in rows if number is not None}


def _finding(report: Report | None, tracking_id: str) -> Finding | None:
    if report is None:
        return None
    return next((f for f in report.findings if f.tracking_id == tracking_id), None)


def _lesion_key(layout: Layout, finding: Finding | None, centre: object, touched: Sequence[int]) -> int:
    """The lesion's key slice: the image its SR group cites, else the touched slice nearest its centre."""
    for uid in finding.images if finding else ():
        plane = layout.plane_of_image(uid)
        if plane is not None:
            return plane
    point = finding.centre if finding and finding.centre else centre
    if isinstance(point, list | tuple) and len(point) == 3:
        return nearest_plane(layout, [float(v) for v in point], touched)
    return touched[len(touched) // 2]


def _facts(finding: Finding | None) -> tuple[str, ...]:
    if finding is None:
        return ()
    wanted = ("Volume", "Long axis")
    return tuple(m.text for name in wanted for m in finding.measurements if m.name == name and not m.derivation)


# --- one preview, one PNG -------------------------------------------------------------------------------------


def preview_at(
    store: StoreIndex, job_id: int, output: int, segment: int | None, lesion: int | None, slice_: int | None
) -> Preview:
    """One preview of the page, at ``slice_`` (its key slice when ``None``).

    Raises
    ------
    gateway.errors.NotFound
        No job ``job_id``, or its output file is gone.
    ValueError
        A parameter the job's outputs cannot answer.
    """
    detail, _ = _job_detail(store, job_id)
    found = _output(store, detail, output)
    report = None
    for other in _outputs(store, detail):
        if other.model == found.model and other.kind == "SR" and other.path.is_file():
            report = read_report(other.path)
    previews = _previews(found, report, _lesion_sets(detail, found.model))
    chosen = next((p for p in previews if (p.segment, p.lesion) == (segment, lesion)), None)
    if chosen is None:
        raise ValueError("segment: the output has no such segment or lesion")
    if slice_ is None:
        return chosen
    if slice_ not in chosen.slices:
        raise ValueError(f"slice: the {chosen.kind}'s slices of it are {_ranges(chosen.slices)}")
    return replace(chosen, slice=slice_)


def overlay_png(store: StoreIndex, job_id: int, output: int, segment: int | None, slice_: int) -> bytes:
    """The PNG of slice ``slice_`` of the job's output ``output`` (with ``segment`` outlined for a SEG).

    Raises
    ------
    gateway.errors.NotFound
        No job ``job_id``, or the output's file or its source image is gone.
    ValueError
        A parameter the output cannot answer.
    """
    detail, _ = _job_detail(store, job_id)
    found = _output(store, detail, output)
    layout = read_layout(found.path)
    if not 0 <= slice_ < len(layout.planes):
        raise ValueError(f"slice: the output has {len(layout.planes)} slices, numbered from 0")
    with store.sessions() as session:
        source = session.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == layout.planes[slice_].sop_instance_uid)
        )
        window = _display_window(session.scalars(select(ModelVersion.manifest).where(*_model_is(found.model))).first())
    if source is None:
        raise NotFound("the source image of this slice is no longer held (retention purged it)")
    return render_png(layout, found.path, store.data_dir / source, slice_, segment=segment, window=window)


def _output(store: StoreIndex, detail: Mapping[str, Any], index: int) -> _Output:
    outputs = _outputs(store, detail)
    if not 0 <= index < len(outputs):
        raise ValueError(f"output: the job has {len(outputs)} outputs, numbered from 0")
    found = outputs[index]
    if found.kind not in _OVERLAID:
        raise ValueError(f"output: output {index} is a {found.kind}; only a SEG or a Parametric Map has an overlay")
    if not found.path.is_file():
        raise NotFound(f"the file of output {index} is no longer held (retention purged the job's outputs)")
    return found


def _model_is(model: str) -> list[Any]:
    name, _, version = model.partition("@")
    return [ModelVersion.name == name, ModelVersion.version == version]


def _display_window(manifest: Mapping[str, Any] | None) -> Window | None:
    """The model's ``outputs.display_window`` (centre, width), if its manifest gives one."""
    value = ((manifest or {}).get("outputs") or {}).get("display_window")
    try:
        return Window(float(value[0]), float(value[1])) if value else None
    except (TypeError, ValueError, IndexError):
        return None


# --- routes -----------------------------------------------------------------------------------------------------


@router.get("/{job_id}/results")
def results_page(request: Request, job_id: int, _: Reader) -> HTMLResponse:
    """The results of a job, for a radiologist (``?output=&segment=&lesion=&slice=`` moves one preview)."""
    store: StoreIndex = request.app.state.store
    view = results_view(
        store,
        job_id,
        viewer_url=request.app.state.settings.ui.viewer_url,
        dicomweb_root=dicomweb_base_url(request),
    )
    moved = _moved(request.query_params)
    if moved is not None:
        view = _with_slice(view, *moved)
    numbers = image_numbers(store, [p for m in view.models for p in m.previews])
    context = {"view": view, "numbers": numbers, "active": "jobs", "title": f"Results of job {job_id}"}
    return render(request, "results.html", context)


@router.get("/{job_id}/results/preview")
def results_preview(request: Request, job_id: int, _: Reader) -> HTMLResponse:
    """One preview of the results page at another slice (an htmx fragment)."""
    params = request.query_params
    output, segment, lesion, slice_ = (_index(params, key) for key in ("output", "segment", "lesion", "slice"))
    if output is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="output: required")
    try:
        preview = preview_at(request.app.state.store, job_id, output, segment, lesion, slice_)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from exc
    numbers = image_numbers(request.app.state.store, [preview])
    return render(request, "results_preview.html", {"preview": preview, "job_id": job_id, "numbers": numbers})


@router.get("/{job_id}/overlay")
def overlay(request: Request, job_id: int, _: Reader) -> Response:
    """The PNG of one slice of a SEG (with a segment's outline) or a Parametric Map (as colours)."""
    params = request.query_params
    output, segment, slice_ = (_index(params, key) for key in ("output", "segment", "slice"))
    if output is None or slice_ is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="output and slice: required")
    try:
        png = overlay_png(request.app.state.store, job_id, output, segment, slice_)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def _index(params: Mapping[str, str], key: str) -> int | None:
    """A non-negative integer query parameter (``None`` when absent); 400 for anything else."""
    value = params.get(key)
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit() and int(value) <= _MAX_INDEX):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=f"{key}: a number from 0 to {_MAX_INDEX}")
    return int(value)


def _moved(params: Mapping[str, str]) -> tuple[int, int | None, int | None, int] | None:
    output, slice_ = _index(params, "output"), _index(params, "slice")
    if output is None or slice_ is None:
        return None
    return output, _index(params, "segment"), _index(params, "lesion"), slice_


def _with_slice(view: ResultsView, output: int, segment: int | None, lesion: int | None, slice_: int) -> ResultsView:
    """The view with one preview moved to ``slice_`` (a slice it does not touch is 400)."""
    models = []
    for model in view.models:
        previews = []
        for p in model.previews:
            if (p.output, p.segment, p.lesion) == (output, segment, lesion):
                if slice_ not in p.slices:
                    raise HTTPException(
                        status.HTTP_400_BAD_REQUEST, detail=f"slice: {p.title} lies on {_ranges(p.slices)}"
                    )
                p = replace(p, slice=slice_)
            previews.append(p)
        models.append(replace(model, previews=tuple(previews)))
    return replace(view, models=tuple(models))


# --- text -------------------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "its file is no longer held"
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__} reading its file"


def _ranges(values: Sequence[int]) -> str:
    """``0-4, 9-12``."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _person_name(value: str | None) -> str | None:
    """``DOE^JANE^M`` as ``DOE, JANE M`` (the alphabetic group of a DICOM PN)."""
    if not value:
        return None
    family, _, rest = value.split("=")[0].partition("^")
    given = " ".join(part for part in rest.split("^")[:2] if part)
    return f"{family}, {given}" if given else family


def _date(value: str | None) -> str | None:
    """``20240131`` as ``2024-01-31``."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or None
