"""C-GET and C-MOVE sub-operations by the archive's retrieval rule (kho.archive.read.transcode),
against real peers: dcmtk's getscu and movescu -> storescp preferring each transfer syntax
they offer, for one study holding instances received native (little and big endian, JPEG-LS
at rest), JPEG-LS, JPEG lossless (process 14 SV1 and predictor 6), RLE, JPEG 2000 lossless,
and lossy JPEG baseline and JPEG 2000.  Every instance arrives; lossless pixels equal the
original's (pydicom's decoding of what arrived against pydicom's decoding of what was
sent), lossy originals arrive as received or decoded; a syntax nothing can produce fails
its sub-operation and the instance is listed in the Failed SOP Instance UID List."""

from __future__ import annotations

import re
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.dataset.part10 import read_file_meta
from kho.archive.read import transcode
from kho.archive.read.pixels import stored_frame
from kho.dicom_scp.server import DicomServer
from tests.conftest import SAMPLES_DIR
from tests.helpers import dcmtk
from tests.helpers.part10 import part10_bytes

EVRLE = "1.2.840.10008.1.2.1"
IVRLE = "1.2.840.10008.1.2"
EVRBE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_P14 = "1.2.840.10008.1.2.4.57"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"
JLS = "1.2.840.10008.1.2.4.80"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"

#: dcmtk's preference options (getscu and storescp alike) and the syntax each prefers
PREFERRED = {
    "+x=": EVRLE,  # explicit VR, local byte order (little endian here)
    "+xe": EVRLE,
    "+xi": IVRLE,
    "+xb": EVRBE,
    "+xd": DEFLATED,
    "+xs": JPEG_SV1,
    "+xv": J2K_LOSSLESS,
    "+xw": J2K,
    "+xt": JLS,
    "+xu": JLS_NEAR,
    "+xr": RLE,
    "+xy": JPEG_BASELINE,
    "+xx": JPEG_EXTENDED,
}
#: what getscu 3.6.7 proposes first: as PREFERRED, but with +xi it proposes Explicit VR
#: Little Endian alone for its storage contexts (dcmtk's option names incoming syntaxes)
GETSCU_FIRST = {**PREFERRED, "+xi": EVRLE}
#: lossy syntaxes kho produces from nothing but the same received bytes
LOSSY_ONLY = {"+xy", "+xx"}

#: (file, where it comes from): one study of every kind the issue names
SOURCES = (
    "693_UNCR.dcm",  # native CT, signed 14 bit: JPEG-LS at rest
    "SC_rgb_2frame.dcm",  # native RGB, 2 frames: JPEG-LS at rest
    "emri_small_big_endian.dcm",  # native big endian MR, 10 frames
    "emri_small_jpeg_ls_lossless.dcm",  # received JPEG-LS
    "JLSL_16_15_1_1F.dcm",  # received JPEG-LS, signed 15 bit
    "JPEG-LL.dcm",  # received JPEG lossless SV1, signed 16 bit
    "emri_small_RLE.dcm",  # received RLE
    "US1_J2KR.dcm",  # received JPEG 2000 lossless, YBR_RCT colour
    "US1_J2KI.dcm",  # received JPEG 2000 (lossy, YBR_ICT)
    "SC_rgb_jpeg_dcmtk.dcm",  # received JPEG baseline (lossy, YBR_FULL_422; pydicom's)
)


@dataclass(frozen=True)
class Sent:
    """An instance as sent to kho: its bytes, syntax, and pixels as pydicom decodes them."""

    name: str
    sop_uid: str
    data: bytes
    transfer_syntax_uid: str
    pixels: np.ndarray

    @property
    def lossy(self) -> bool:
        return transcode.is_lossy(self.transfer_syntax_uid)


def _source_path(name: str) -> Path:
    path = SAMPLES_DIR / name
    if path.exists():
        return path
    return Path(pydicom.data.get_testdata_file(name))  # type: ignore[arg-type]


def _read(data: bytes | Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(data if isinstance(data, Path) else BytesIO(data), force=True)


def _into_study(ds: Dataset, study: str) -> bytes:
    """The dataset in one test study with fresh series and instance UIDs (several samples
    share theirs), written in its own syntax: encapsulated pixels keep their bytes."""
    ds.PatientID = "RETRIEVE-SYNTAXES"
    ds.PatientName = "Syntaxes^Retrieve"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return part10_bytes(ds)


def _jpeg_process14(study: str) -> bytes:
    """An MR received as JPEG lossless process 14 with predictor 6 (liblj92 through
    imagecodecs): not selection value 1, so a JPEG lossless SV1 peer needs a transcode."""
    ds = _read(SAMPLES_DIR / "emri_small.dcm")
    frames = [
        bytes(imagecodecs.ljpeg_encode(frame.astype(np.uint16), bitspersample=12))
        for frame in ds.pixel_array
    ]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG_P14
    return _into_study(ds, study)


@dataclass
class Served:
    archive: Archive
    port: int
    study: str
    sent: dict[str, Sent]  # by SOP Instance UID


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("retrieve-syntaxes")
    settings = Settings(
        data_dir=root / "data",
        dicom_port=0,
        ae_title="KHO",
        fsync=False,
        finish_in_background=False,  # native pixels at rest as JPEG-LS at once
        move_destinations={"STORESCP": f"127.0.0.1:{dcmtk.free_port()}"},
    )
    study = generate_uid()
    with Archive(settings) as archive:
        archive.derivers = []  # retrieval needs the stored bytes, not thumbnails
        files = {name: _into_study(_read(_source_path(name)), study) for name in SOURCES}
        files["emri_small_p14_predictor6"] = _jpeg_process14(study)
        sent: dict[str, Sent] = {}
        for name, data in files.items():
            result = archive.ingest_part10(data, lenient_identity=True)
            ds = _read(data)
            sent[result.sop_uid] = Sent(
                name, result.sop_uid, data, str(ds.file_meta.TransferSyntaxUID), ds.pixel_array
            )
        records = [archive.catalog.require_instance(uid) for uid in sent]
        # the kinds the tests are about are there
        assert {r.pixel_format for r in records} >= {"jpeg-ls", "encapsulated"}
        assert {r.transfer_syntax_uid for r in records} >= {
            EVRLE,
            EVRBE,
            JLS,
            JPEG_SV1,
            JPEG_P14,
            RLE,
            J2K_LOSSLESS,
            J2K,
            JPEG_BASELINE,
        }
        server = DicomServer(archive).start()
        try:
            yield Served(archive, server.port, study, sent)
        finally:
            server.stop()


def _study_query(folder: Path, study: str) -> Path:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    path = folder / "query.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def _arrived(folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        meta = _read(path).file_meta
        out[str(meta.MediaStorageSOPInstanceUID)] = path
    return out


def _dataset_bytes(data: bytes) -> bytes:
    _meta, offset = read_file_meta(data)
    return data[offset:]


def _check_arrived(served: Served, sent: Sent, path: Path, allowed: set[str]) -> str:
    """What arrived is the instance sent: bit for bit in its received syntax, else (in a
    syntax the peer accepted) the same pixels; returns the syntax it arrived in."""
    data = path.read_bytes()
    got = _read(data)
    syntax = str(got.file_meta.TransferSyntaxUID)
    assert syntax in allowed | {sent.transfer_syntax_uid}, (sent.name, syntax)
    assert got.SOPInstanceUID == sent.sop_uid
    if syntax == sent.transfer_syntax_uid:
        # as received: the dataset bytes kho was sent
        assert _dataset_bytes(data) == _dataset_bytes(sent.data), sent.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = got.pixel_array
    # lossless originals: the same pixels; lossy ones decoded (pydicom, as the test does)
    np.testing.assert_array_equal(pixels, sent.pixels, err_msg=f"{sent.name} as {syntax}")
    if sent.lossy and syntax != sent.transfer_syntax_uid:
        assert got.LossyImageCompression == "01", sent.name
    return syntax


# --- C-GET with getscu ------------------------------------------------------------------


def _getscu(served: Served, option: str, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    query = _study_query(out.parent, served.study)
    result = subprocess.run(
        [dcmtk.tool("getscu"), "-v", "-S", "-aec", "KHO", option, "+B", "-od", str(out),
         "127.0.0.1", str(served.port), str(query)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=120,
    )  # fmt: skip
    return result.stdout + result.stderr


@pytest.mark.parametrize("option", sorted(PREFERRED))
def test_getscu_preferring_each_syntax(served: Served, tmp_path: Path, option: str) -> None:
    """getscu proposes its preferred syntax first for every storage class and kho (as the
    C-GET acceptor) takes the requestor's first: every instance must go out in it."""
    preferred = GETSCU_FIRST[option]
    log = _getscu(served, option, tmp_path / "got")
    arrived = _arrived(tmp_path / "got")
    for uid, path in arrived.items():
        assert _check_arrived(served, served.sent[uid], path, {preferred}) == preferred
    if option in LOSSY_ONLY:
        # only an instance received in that lossy syntax can go; the rest fail (below)
        expected = {u for u, s in served.sent.items() if s.transfer_syntax_uid == preferred}
        assert set(arrived) == expected, log[-3000:]
        assert re.search(r"Failed|Warning", log), log[-3000:]
    else:
        assert set(arrived) == set(served.sent), log[-3000:]
        assert len(re.findall(r"Received C-STORE Request", log)) == len(served.sent)


def test_getscu_jpeg_ls_gets_the_at_rest_streams_unchanged(served: Served, tmp_path: Path) -> None:
    """The issue's case: getscu +xt got 2 of 7.  Native instances held as JPEG-LS at rest go
    out as those very streams (re-wrapped, not decoded and encoded again)."""
    _getscu(served, "+xt", tmp_path / "got")
    arrived = _arrived(tmp_path / "got")
    assert set(arrived) == set(served.sent)
    rewrapped = 0
    for uid, path in arrived.items():
        record = served.archive.catalog.require_instance(uid)
        if record.pixel_format != "jpeg-ls":
            continue
        got = _read(path)
        frames = int(got.get("NumberOfFrames", 1) or 1)
        fragments = list(generate_frames(got.PixelData, number_of_frames=frames))
        stored = [stored_frame(served.archive, record, n + 1)[0] for n in range(frames)]
        # a fragment of odd length gets one padding byte (PS3.5 A.4)
        assert [f[: len(s)] for f, s in zip(fragments, stored, strict=True)] == stored
        assert all(len(f) - len(s) in (0, 1) for f, s in zip(fragments, stored, strict=True))
        # P (SOF55 precision) is Bits Stored, as the header says
        sof = fragments[0].index(b"\xff\xf7")
        assert fragments[0][sof + 4] == got.BitsStored
        if int(got.SamplesPerPixel) > 1:
            assert got.PlanarConfiguration == 0
        rewrapped += 1
    assert rewrapped >= 2


def test_jpeg_lossless_sv1_peer_gets_a_process14_instance(served: Served, tmp_path: Path) -> None:
    """The issue's case: a peer that takes JPEG lossless SV1 only got nothing for an
    instance received as JPEG lossless process 14 (predictor 6): now transcoded to SV1."""
    (source,) = [s for s in served.sent.values() if s.transfer_syntax_uid == JPEG_P14]
    _getscu(served, "+xs", tmp_path / "got")
    got = _read(_arrived(tmp_path / "got")[source.sop_uid])
    assert got.file_meta.TransferSyntaxUID == JPEG_SV1
    frames = list(generate_frames(got.PixelData, number_of_frames=int(got.NumberOfFrames)))
    for stream in frames:
        sos = stream.index(b"\xff\xda")
        components = stream[sos + 4]
        assert stream[sos + 5 + 2 * components] == 1  # Ss: selection value (predictor) 1
    np.testing.assert_array_equal(got.pixel_array, source.pixels)


def _pynetdicom_get(served: Served, syntax: str) -> tuple[Any, set[str]]:
    """A C-GET by a pynetdicom peer whose storage contexts take ``syntax`` only: (final
    response status dataset and identifier, SOP Instance UIDs stored)."""
    stored: set[str] = set()

    def on_store(event: Any) -> int:
        stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    classes = sorted({r.sop_class_uid for r in _records(served)})
    ae = AE(ae_title="PYGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in classes:
        ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
    assoc = ae.associate(
        "127.0.0.1",
        served.port,
        ae_title="KHO",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = served.study
    try:
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    return responses[-1], stored


def _records(served: Served) -> list[Any]:
    return [served.archive.catalog.require_instance(uid) for uid in served.sent]


def test_a_syntax_nothing_can_produce_fails_its_sub_operations(served: Served) -> None:
    """A peer taking JPEG baseline only: the instance received so goes as received; the
    lossless ones cannot (kho never encodes lossily): failed, each listed."""
    (final, identifier), stored = _pynetdicom_get(served, JPEG_BASELINE)
    baseline = {u for u, s in served.sent.items() if s.transfer_syntax_uid == JPEG_BASELINE}
    assert stored == baseline
    assert int(final.Status) == 0xB000  # some sub-operations failed
    assert final.NumberOfCompletedSuboperations == len(baseline)
    assert final.NumberOfFailedSuboperations == len(served.sent) - len(baseline)
    assert set(identifier.FailedSOPInstanceUIDList) == set(served.sent) - baseline


# --- C-MOVE with movescu -> storescp --------------------------------------------------------


def _movescu(served: Served, folder: Path) -> str:
    query = _study_query(folder, served.study)
    result = subprocess.run(
        [dcmtk.tool("movescu"), "-v", "-S", "-aec", "KHO", "-aem", "STORESCP",
         "127.0.0.1", str(served.port), str(query)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=180,
    )  # fmt: skip
    return result.stdout + result.stderr


@pytest.mark.parametrize("option", sorted(PREFERRED))
def test_movescu_to_storescp_preferring_each_syntax(
    served: Served, tmp_path: Path, option: str
) -> None:
    """kho proposes, per SOP class, every syntax it can produce in one context (storescp
    picks its preferred) and each received syntax alone: every instance arrives, as
    received where storescp takes that syntax, else in storescp's preferred syntax (or
    Explicit VR Little Endian, storescp's next choice, where that is a lossy one)."""
    destination = served.archive.settings.move_destination("STORESCP")
    assert destination is not None
    preferred = PREFERRED[option]
    fallback = EVRLE if option in LOSSY_ONLY else preferred
    # storescp's last preference option wins over run_storescp's --accept-all
    with dcmtk.run_storescp(tmp_path / "dest", port=destination[1], extra=(option,)) as scp:
        log = _movescu(served, tmp_path)
        arrived = _arrived(scp.folder)
    assert set(arrived) == set(served.sent), log[-3000:]
    for uid, path in arrived.items():
        syntax = _check_arrived(served, served.sent[uid], path, {fallback})
        assert syntax in (served.sent[uid].transfer_syntax_uid, fallback)
    assert re.search(r"Move Response.*\(Success\)", log), log[-3000:]


def test_a_move_destination_taking_nothing_kho_can_produce(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-MOVE destination that takes JPEG baseline only (a pynetdicom storage SCP): the
    baseline instance goes as received, every other sub-operation fails, each listed."""
    # kho's server lets pynetdicom accept any storage context (a process-wide setting);
    # this destination, in the same process, must accept only what it lists
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    stored: set[str] = set()

    def on_store(event: Any) -> int:
        stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    dest = AE(ae_title="PYSTORE")
    for sop_class in sorted({r.sop_class_uid for r in _records(served)}):
        dest.add_supported_context(sop_class, [JPEG_BASELINE])
    server = dest.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    destinations = served.archive.settings.move_destinations
    destinations["PYSTORE"] = f"127.0.0.1:{server.server_address[1]}"
    try:
        ae = AE(ae_title="PYMOVE")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", served.port, ae_title="KHO")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = served.study
        try:
            responses = list(
                assoc.send_c_move(identifier, "PYSTORE", StudyRootQueryRetrieveInformationModelMove)
            )
        finally:
            assoc.release()
    finally:
        server.shutdown()
        del destinations["PYSTORE"]
    final, failed = responses[-1]
    baseline = {u for u, s in served.sent.items() if s.transfer_syntax_uid == JPEG_BASELINE}
    assert stored == baseline
    assert int(final.Status) == 0xB000
    assert final.NumberOfFailedSuboperations == len(served.sent) - len(baseline)
    assert set(failed.FailedSOPInstanceUIDList) == set(served.sent) - baseline
