"""Query/Retrieve against real peers: dcmtk's findscu (patient and study root, every
matching type at each level), getscu and movescu (to a dcmtk storescp started here); every
retrieved instance is compared bit for bit with what kho stored.  Errors get precise
statuses and the server keeps serving."""

from __future__ import annotations

import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.dataset.part10 import read_file_meta
from kho.archive.read.transcode import PROPOSAL_ORDER
from kho.dicom_scp.server import DicomServer
from tests.archive.test_query import _fill
from tests.helpers import dcmtk

UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


@pytest.fixture(scope="module")
def qr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One archive with the synthetic studies and the real samples, served over DICOM."""
    root = tmp_path_factory.mktemp("qr")
    store_port = dcmtk.free_port()
    down_port = dcmtk.free_port()  # nothing listens there
    settings = Settings(
        data_dir=root / "data",
        dicom_port=0,
        ae_title="KHO",
        fsync=False,
        move_destinations={
            "STORESCP": f"127.0.0.1:{store_port}",
            "DOWNSCP": f"127.0.0.1:{down_port}",
        },
    )
    with Archive(settings) as archive:
        made = _fill(archive)
        server = DicomServer(archive).start()
        try:
            yield {
                "archive": archive,
                "made": made,
                "port": server.port,
                "store_port": store_port,
                "root": root,
            }
        finally:
            server.stop()


def _stored_dataset(archive: Archive, sop_uid: str) -> bytes:
    return archive.read_dataset(archive.catalog.require_instance(sop_uid))


def _dataset_part(path: Path) -> bytes:
    data = path.read_bytes()
    _meta, offset = read_file_meta(data)
    return data[offset:]


# --- C-FIND with findscu ----------------------------------------------------------------


def findscu(
    port: int, model: str, keys: list[str], out: Path, *, extra: tuple[str, ...] = ()
) -> tuple[list[Dataset], str]:
    """Run findscu; return the response identifiers (extracted files) and its log."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [dcmtk.tool("findscu"), "-v", model, "-aec", "KHO", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    args += [*extra, "127.0.0.1", str(port)]
    result = subprocess.run(args, capture_output=True, text=True, env=dcmtk.env(), timeout=60)
    log = result.stdout + result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return answers, log


def _final_status(log: str) -> str:
    found = re.findall(r"Final Find Response[^\n]*|Find response with error status[^\n]*", log)
    return found[-1] if found else ""


def _keys_of(made: dict[str, Any], key: str) -> str:
    return made["studies"][key]["uid"]


# (model, level, keys to send, what identifies a match, expected matches)
FIND_CASES = [
    # patient level (patient root only)
    ("-P", "PATIENT", ["PatientID=Q1", "PatientName"], "PatientID", {"Q1"}),  # single value
    ("-P", "PATIENT", ["PatientName=SMI*", "PatientID"], "PatientID", {"Q1"}),  # wildcard
    ("-P", "PATIENT", ["PatientName=SM?THE^*", "PatientID"], "PatientID", {"Q%5"}),
    ("-P", "PATIENT", ["PatientID=Q*", "PatientBirthDate=-19650101"], "PatientID", {"Q1", "Q2"}),
    ("-P", "PATIENT", ["PatientID=Q?", "PatientSex=F"], "PatientID", {"Q2", "Q4"}),
    # study level
    ("-S", "STUDY", ["StudyDate=20200101-20200615", "PatientID=Q*"], "StudyID", {"s1", "s2", "s5"}),
    ("-S", "STUDY", ["StudyDate=20210101-", "PatientID=Q*"], "StudyID", {"s3"}),
    ("-S", "STUDY", ["StudyDate=20200101", "StudyID"], "StudyID", {"s1"}),
    ("-S", "STUDY", ["StudyTime=1000-1100", "PatientID=Q*", "StudyID"], "StudyID", {"s1"}),
    (
        "-S",
        "STUDY",
        ["ModalitiesInStudy=MR", "PatientID=Q*", "StudyID"],
        "StudyID",
        {"s1", "s2", "s6"},
    ),
    ("-S", "STUDY", ["AccessionNumber=ACC?", "StudyID"], "StudyID", {"s1", "s2", "s3", "s4"}),
    ("-S", "STUDY", ["PatientName=smith^jane", "StudyID"], "StudyID", {"s3"}),
    ("-P", "STUDY", ["PatientID=Q1", "StudyID", "StudyDescription=HEAD"], "StudyID", {"s2"}),
    ("-P", "STUDY", ["PatientID=Q1", "StudyID"], "StudyID", {"s1", "s2"}),  # universal
]


@pytest.mark.parametrize(("model", "level", "keys", "ident", "expected"), FIND_CASES)
def test_findscu_matching(
    qr: dict[str, Any],
    tmp_path: Path,
    model: str,
    level: str,
    keys: list[str],
    ident: str,
    expected: set[str],
) -> None:
    keys = [f"QueryRetrieveLevel={level}", *keys]
    if not any(k.split("=")[0] == ident for k in keys):  # a later -k would empty the value
        keys.append(ident)
    answers, log = findscu(qr["port"], model, keys, tmp_path)
    assert "Success" in _final_status(log), log[-2000:]
    found = {str(a.get(ident, "")) for a in answers}
    if ident == "StudyID":  # the real samples have study IDs too: keep the synthetic ones
        found &= {s[0] for s in _study_rows()}
    assert found == expected, log[-3000:]
    for answer in answers:
        assert answer.QueryRetrieveLevel == level
        for key in keys:  # every requested key is answered
            keyword = key.split("=")[0]
            assert keyword in answer, (keyword, answer)


def _study_rows() -> list[tuple[str, ...]]:
    from tests.archive.test_query import STUDIES

    return [(s[0],) for s in STUDIES]


def test_findscu_uid_list_and_series_and_image_levels(qr: dict[str, Any], tmp_path: Path) -> None:
    made = qr["made"]
    s1, s4 = _keys_of(made, "s1"), _keys_of(made, "s4")
    # list of UID matching at the study level, return keys filled from the catalog
    answers, log = findscu(
        qr["port"],
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={s1}\\{s4}",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "ModalitiesInStudy",
            "PatientName",
        ],
        tmp_path / "a",
    )
    by_uid = {a.StudyInstanceUID: a for a in answers}
    assert set(by_uid) == {s1, s4}, log[-2000:]
    assert by_uid[s1].NumberOfStudyRelatedSeries == 2
    assert by_uid[s1].NumberOfStudyRelatedInstances == 5
    assert list(by_uid[s1].ModalitiesInStudy) == ["CT", "MR"]
    assert str(by_uid[s4].PatientName) == "Müller^Jürgen"  # decoded by SpecificCharacterSet
    assert by_uid[s4].SpecificCharacterSet == "ISO_IR 192"
    # series of a study (study root), with a modality filter
    answers, log = findscu(
        qr["port"],
        "-S",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={s1}",
            "Modality=CT",
            "SeriesInstanceUID",
            "NumberOfSeriesRelatedInstances",
        ],
        tmp_path / "b",
    )
    assert [a.SeriesInstanceUID for a in answers] == [made["series"]["s1.1"]["uid"]], log
    assert answers[0].NumberOfSeriesRelatedInstances == 3
    # images of a series (patient root needs the patient and study unique keys)
    series = made["series"]["s1.1"]["uid"]
    sops = made["instances"]["s1.1"]
    answers, log = findscu(
        qr["port"],
        "-P",
        [
            "QueryRetrieveLevel=IMAGE",
            "PatientID=Q1",
            f"StudyInstanceUID={s1}",
            f"SeriesInstanceUID={series}",
            f"SOPInstanceUID={sops[0]}\\{sops[2]}",
            "InstanceNumber",
            "SOPClassUID",
        ],
        tmp_path / "c",
    )
    assert sorted(int(a.InstanceNumber) for a in answers) == [1, 3], log
    assert {a.SOPInstanceUID for a in answers} == {sops[0], sops[2]}
    answers, _log = findscu(
        qr["port"],
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={s1}",
            f"SeriesInstanceUID={series}",
            "InstanceNumber=2",
            "SOPInstanceUID",
        ],
        tmp_path / "d",
    )
    assert [a.SOPInstanceUID for a in answers] == [sops[1]]


def test_every_real_sample_is_found_by_findscu(qr: dict[str, Any], tmp_path: Path) -> None:
    archive: Archive = qr["archive"]
    answers, log = findscu(
        qr["port"],
        "-S",
        ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "NumberOfStudyRelatedInstances"],
        tmp_path,
    )
    assert "Success" in _final_status(log)
    assert len(answers) == archive.catalog.counts()["studies"]
    assert (
        sum(int(a.NumberOfStudyRelatedInstances) for a in answers)
        == (archive.catalog.counts()["instances"])
    )


# --- statuses, checked with a pynetdicom SCU ----------------------------------------------


def _scu_find(port: int, identifier: Dataset, model: Any) -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    assert assoc.is_established
    try:
        return [
            (int(status.Status), answer) for status, answer in assoc.send_c_find(identifier, model)
        ]
    finally:
        assoc.release()


def _identifier(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _still_serving(port: int) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.parametrize(
    ("model", "keys", "status"),
    [
        # no level, a level the model lacks, a level that needs a missing unique key
        (StudyRootQueryRetrieveInformationModelFind, {"PatientID": "Q1"}, 0xA900),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "PATIENT", "PatientID": ""},
            0xA900,
        ),
        (
            PatientRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""},
            0xA900,
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.*"},
            0xA900,
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "FRAME", "StudyInstanceUID": ""},
            0xA900,
        ),
        # malformed values
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "STUDY", "StudyDate": "2020-01-01"},
            0xC000,
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3*"},
            0xC000,
        ),
    ],
)
def test_refused_queries_get_precise_statuses(
    qr: dict[str, Any], model: Any, keys: dict[str, str], status: int
) -> None:
    responses = _scu_find(qr["port"], _identifier(**keys), model)
    assert [s for s, _ in responses] == [status]
    _still_serving(qr["port"])


def test_unsupported_optional_keys_answer_pending_warning(qr: dict[str, Any]) -> None:
    identifier = _identifier(
        QueryRetrieveLevel="STUDY", PatientID="Q1", StudyInstanceUID="", PatientComments=""
    )
    responses = _scu_find(qr["port"], identifier, StudyRootQueryRetrieveInformationModelFind)
    statuses = [s for s, _ in responses]
    assert statuses == [0xFF01, 0xFF01, 0x0000]
    for _status, answer in responses[:-1]:
        assert answer is not None and "PatientComments" in answer
        assert answer.PatientComments == ""


def test_result_cap_refuses_with_out_of_resources(qr: dict[str, Any]) -> None:
    archive: Archive = qr["archive"]
    previous = archive.settings.find_result_limit
    archive.settings.find_result_limit = 2
    try:
        many = _identifier(QueryRetrieveLevel="STUDY", PatientID="Q*", StudyInstanceUID="")
        responses = _scu_find(qr["port"], many, StudyRootQueryRetrieveInformationModelFind)
        assert [s for s, _ in responses] == [0xA700]  # refused before any match
        few = _identifier(QueryRetrieveLevel="STUDY", PatientID="Q1", StudyInstanceUID="")
        responses = _scu_find(qr["port"], few, StudyRootQueryRetrieveInformationModelFind)
        assert [s for s, _ in responses] == [0xFF00, 0xFF00, 0x0000]
    finally:
        archive.settings.find_result_limit = previous


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A catalog with 3000 studies (rows only): a find long enough to cancel."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("bulk"), dicom_port=0, fsync=False, find_result_limit=0
    )
    with Archive(settings) as archive:
        catalog = archive.catalog
        with catalog.transaction():
            catalog.execute(
                "INSERT INTO patients VALUES ('k', 'BULK', '', 'BULK^PAT', 'BULK^PAT', '', '', "
                "3000, 0)"
            )
            for i in range(3000):
                catalog.execute(
                    "INSERT INTO studies (study_uid, patient_key, study_date, study_time, "
                    "accession_number, study_id, study_description, referring_physician_name, "
                    "updated_at) VALUES (?, 'k', '20240101', '', '', '', '', '', 0)",
                    (f"1.2.3.4.{i}",),
                )
        server = DicomServer(archive).start()
        try:
            yield {"archive": archive, "port": server.port}
        finally:
            server.stop()


def test_c_cancel_stops_a_find(bulk: dict[str, Any], tmp_path: Path) -> None:
    # findscu sends C-CANCEL after the first response; kho answers Cancel (0xFE00)
    answers, log = findscu(
        bulk["port"],
        "-S",
        ["QueryRetrieveLevel=STUDY", "PatientID=BULK", "StudyInstanceUID"],
        tmp_path,
        extra=("--cancel", "1"),
    )
    assert "Sending Cancel Request" in log, log[-2000:]
    assert "Cancel" in _final_status(log), log[-2000:]
    assert 1 <= len(answers) < 3000
    _still_serving(bulk["port"])
    # without the cap (find_result_limit = 0) the whole list comes back
    answers, log = findscu(
        bulk["port"], "-S", ["QueryRetrieveLevel=STUDY", "PatientID=BULK", "StudyInstanceUID"],
        tmp_path,
    )  # fmt: skip
    assert len(answers) == 3000
    assert "Success" in _final_status(log)


# --- C-GET with getscu ----------------------------------------------------------------------


def _query_file(folder: Path, name: str, **keys: str) -> Path:
    ds = _identifier(**keys)
    path = folder / f"{name}.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def _study_queries(qr: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = qr["archive"].catalog.fetchall("SELECT study_uid FROM studies ORDER BY study_uid")
    return [
        _query_file(folder, f"q{i:03d}", QueryRetrieveLevel="STUDY", StudyInstanceUID=r[0])
        for i, r in enumerate(rows)
    ]


def _received(folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meta = pydicom.dcmread(path, stop_before_pixels=True)
            out[str(meta.file_meta.MediaStorageSOPInstanceUID)] = path
    return out


def _check_retrieved(archive: Archive, received: dict[str, Path]) -> dict[str, Any]:
    """Each received instance is the stored one: bit for bit when it went in its stored
    syntax, else decoded to the same pixels under the same SOP Instance UID."""
    tally = {"raw": 0, "converted": 0, "missing": []}
    for record in archive.catalog.iter_instances():
        path = received.get(record.sop_uid)
        if path is None:
            tally["missing"].append(record)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        if str(meta.TransferSyntaxUID) == record.transfer_syntax_uid:
            assert _dataset_part(path) == archive.read_dataset(record), record.sop_uid
            tally["raw"] += 1
        else:
            # the peer negotiated another syntax for this SOP class: converted (into one it
            # preferred among those kho produces losslessly), same identity
            assert str(meta.TransferSyntaxUID) in PROPOSAL_ORDER, record.sop_uid
            assert str(meta.MediaStorageSOPInstanceUID) == record.sop_uid
            tally["converted"] += 1
    return tally


def test_getscu_retrieves_every_study_bit_for_bit(qr: dict[str, Any], tmp_path: Path) -> None:
    """getscu proposes the uncompressed syntaxes for its fixed list of storage classes:
    uncompressed instances arrive bit for bit, compressed ones decoded; what cannot be
    sent (a SOP class getscu did not propose, pixel data no decoder reads) is counted as a
    failed sub-operation."""
    archive: Archive = qr["archive"]
    out = tmp_path / "got"
    out.mkdir()
    failed = completed = 0
    # one getscu per study: getscu stops at the first study with a failed sub-operation
    for query in _study_queries(qr, tmp_path / "queries"):
        result = subprocess.run(
            [dcmtk.tool("getscu"), "-v", "-S", "-aec", "KHO", "+B", "-od", str(out),
             "127.0.0.1", str(qr["port"]), str(query)],
            capture_output=True, text=True, env=dcmtk.env(), timeout=60,
        )  # fmt: skip
        log = result.stdout + result.stderr
        assert "Association Accepted" in log, log
        study = pydicom.dcmread(query, force=True).StudyInstanceUID
        in_study = archive.catalog.fetchone(
            "SELECT count(*) FROM instances WHERE study_uid = ?", (study,)
        )[0]
        got = len(re.findall(r"Received C-STORE Request", log))
        completed += got
        failed += in_study - got
        if got < in_study:  # a final warning or failure status, never success
            assert re.search(r"Warning|Refused|Failed", log), log
    received = _received(out)
    tally = _check_retrieved(archive, received)
    assert completed == len(received)
    assert failed == len(tally["missing"])
    assert tally["raw"] >= 25 and tally["converted"] >= 20, tally
    # what did not arrive could not have: no decoder, or a SOP class getscu lacks
    for record in tally["missing"]:
        assert record.transfer_syntax_uid not in UNCOMPRESSED or record.sop_class_uid in (
            "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map: not in getscu's list
        ), (record.sop_uid, record.sop_class_uid, record.transfer_syntax_uid)
    _still_serving(qr["port"])


def test_converted_instances_keep_identity_and_pixels(qr: dict[str, Any], tmp_path: Path) -> None:
    """A JPEG-compressed instance fetched by a peer that takes only uncompressed syntaxes
    arrives decoded, same SOP Instance UID, same pixels as pydicom decodes from the stored
    bytes."""
    archive: Archive = qr["archive"]
    compressed = [
        r
        for r in archive.catalog.iter_instances()
        if r.transfer_syntax_uid in ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80")
        and r.sop_class_uid in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7")
    ]
    assert compressed
    record = compressed[0]
    out = tmp_path / "got"
    out.mkdir()
    query = _query_file(
        tmp_path,
        "q",
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=record.study_uid,
        SeriesInstanceUID=record.series_uid,
        SOPInstanceUID=record.sop_uid,
    )
    result = subprocess.run(
        [dcmtk.tool("getscu"), "-v", "-S", "-aec", "KHO", "-od", str(out), "127.0.0.1",
         str(qr["port"]), str(query)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=60,
    )  # fmt: skip
    received = _received(out)
    assert list(received) == [record.sop_uid], result.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pydicom.dcmread(received[record.sop_uid])
        original = pydicom.dcmread(pydicom.filebase.DicomBytesIO(archive.read_part10(record)))
    assert got.file_meta.TransferSyntaxUID in UNCOMPRESSED
    assert got.SOPInstanceUID == record.sop_uid
    assert (got.pixel_array == original.pixel_array).all()


def test_c_get_refusals(qr: dict[str, Any]) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", qr["port"], ae_title="KHO")
    assert assoc.is_established
    try:
        # a series-level retrieve without the study's unique key
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_get(
                _identifier(QueryRetrieveLevel="SERIES", SeriesInstanceUID="1.2.3"),
                StudyRootQueryRetrieveInformationModelGet,
            )
        ]
        assert statuses == [0xA900]
        # nothing matches: success with zero sub-operations
        responses = list(
            assoc.send_c_get(
                _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.3.4.5.6"),
                StudyRootQueryRetrieveInformationModelGet,
            )
        )
        assert [int(s.Status) for s, _ in responses] == [0x0000]
        assert responses[0][0].NumberOfCompletedSuboperations == 0
    finally:
        assoc.release()
    _still_serving(qr["port"])


# --- C-MOVE with movescu to dcmtk's storescp -------------------------------------------------


def movescu(port: int, destination: str, queries: list[Path]) -> str:
    result = subprocess.run(
        [dcmtk.tool("movescu"), "-v", "-S", "-aec", "KHO", "-aem", destination,
         "127.0.0.1", str(port), *map(str, queries)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=180,
    )  # fmt: skip
    return result.stdout + result.stderr


# what dcmtk 3.6.7's storescp does not know: these go decoded, or fail if nothing decodes
UNKNOWN_TO_STORESCP = {
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.8.1",
}


def test_movescu_moves_every_study_bit_for_bit(qr: dict[str, Any], tmp_path: Path) -> None:
    archive: Archive = qr["archive"]
    queries = _study_queries(qr, tmp_path / "queries")
    with dcmtk.run_storescp(tmp_path / "dest", ae_title="STORESCP", port=qr["store_port"]) as scp:
        log = movescu(qr["port"], "STORESCP", queries)
        received = _received(scp.folder)
    # storescp accepts every syntax it knows: those go in their stored syntax, unchanged
    tally = _check_retrieved(archive, received)
    assert tally["raw"] == len(received) - tally["converted"]
    for record in tally["missing"]:
        assert record.transfer_syntax_uid in UNKNOWN_TO_STORESCP, record.sop_uid
    converted = [r for r in archive.catalog.iter_instances() if r.sop_uid in received]
    assert all(
        r.transfer_syntax_uid in UNKNOWN_TO_STORESCP
        for r in converted
        if _dataset_part(received[r.sop_uid]) != archive.read_dataset(r)
    )
    assert tally["raw"] >= len(converted) - 4, tally
    assert len(re.findall(r"SubOperationsCompleteOneOrMoreFailures", log)) >= 1


def test_move_to_unknown_or_down_destination(qr: dict[str, Any], tmp_path: Path) -> None:
    made = qr["made"]
    query = _query_file(
        tmp_path, "q", QueryRetrieveLevel="STUDY", StudyInstanceUID=_keys_of(made, "s1")
    )
    log = movescu(qr["port"], "NOSUCHAE", [query])
    assert "MoveDestinationUnknown" in log or "0xa801" in log.lower(), log[-2000:]
    # a configured destination that does not answer: every sub-operation fails, 0xA702
    # "Refused: out of resources" (see kho.dicom_scp.qr and test_move_destinations.py)
    log = movescu(qr["port"], "DOWNSCP", [query])
    assert "Refused" in log, log[-2000:]
    _still_serving(qr["port"])
    # and a move that works afterwards
    with dcmtk.run_storescp(tmp_path / "dest", ae_title="STORESCP", port=qr["store_port"]) as scp:
        log = movescu(qr["port"], "STORESCP", [query])
        assert len(scp.files()) == 5, log[-2000:]


def test_patient_root_move_and_get_of_one_patient(qr: dict[str, Any], tmp_path: Path) -> None:
    """Patient root: PATIENT level by Patient ID (C-MOVE), SERIES level with the patient's
    and the study's unique keys (C-GET)."""
    archive: Archive = qr["archive"]
    made = qr["made"]
    expected = [sop for key in ("s1.1", "s1.2", "s2.1") for sop in made["instances"][key]]
    with dcmtk.run_storescp(tmp_path / "dest", ae_title="STORESCP", port=qr["store_port"]) as scp:
        result = subprocess.run(
            [dcmtk.tool("movescu"), "-v", "-P", "-aec", "KHO", "-aem", "STORESCP",
             "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=Q1",
             "127.0.0.1", str(qr["port"])],
            capture_output=True, text=True, env=dcmtk.env(), timeout=60,
        )  # fmt: skip
        received = _received(scp.folder)
    assert sorted(received) == sorted(expected), result.stderr[-2000:]
    for sop in expected:
        assert _dataset_part(received[sop]) == _stored_dataset(archive, sop)
    out = tmp_path / "got"
    out.mkdir()
    result = subprocess.run(
        [dcmtk.tool("getscu"), "-v", "-P", "-aec", "KHO", "+B", "-od", str(out),
         "-k", "QueryRetrieveLevel=SERIES", "-k", "PatientID=Q1",
         "-k", f"StudyInstanceUID={_keys_of(made, 's1')}",
         "-k", f"SeriesInstanceUID={made['series']['s1.2']['uid']}",
         "127.0.0.1", str(qr["port"])],
        capture_output=True, text=True, env=dcmtk.env(), timeout=60,
    )  # fmt: skip
    received = _received(out)
    assert sorted(received) == sorted(made["instances"]["s1.2"]), result.stderr[-2000:]
    for sop, path in received.items():
        assert _dataset_part(path) == _stored_dataset(archive, sop)


def test_sub_operation_failures_are_counted(qr: dict[str, Any], tmp_path: Path) -> None:
    """A destination that refuses one SOP class: the move ends with 0xB000 and lists the
    instances that failed."""
    made = qr["made"]
    statuses: list[Any] = []
    refused_class = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage

    def on_store(event: Any) -> int:
        return 0xA700 if event.request.AffectedSOPClassUID == refused_class else 0x0000

    dest = AE(ae_title="PYSTORE")
    dest.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    dest.add_supported_context(refused_class, ["1.2.840.10008.1.2.1"])
    server = dest.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    port = server.server_address[1]
    archive: Archive = qr["archive"]
    archive.settings.move_destinations["PYSTORE"] = f"127.0.0.1:{port}"
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.2")  # study root MOVE
        assoc = ae.associate("127.0.0.1", qr["port"], ae_title="KHO")
        identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=_keys_of(made, "s1"))
        statuses = list(assoc.send_c_move(identifier, "PYSTORE", "1.2.840.10008.5.1.4.1.2.2.2"))
        assoc.release()
    finally:
        server.shutdown()
        del archive.settings.move_destinations["PYSTORE"]
    final, failed = statuses[-1]
    assert int(final.Status) == 0xB000
    assert final.NumberOfCompletedSuboperations == 3
    assert final.NumberOfFailedSuboperations == 2
    assert set(failed.FailedSOPInstanceUIDList) == set(made["instances"]["s1.2"])


def test_direct_response_encoding_equals_pydicom(qr: dict[str, Any]) -> None:
    """The identifiers kho writes itself are byte for byte what pydicom writes for the
    same response dataset, in both little endian syntaxes."""
    from pynetdicom.dsutils import encode

    from kho.archive.query import engine as query
    from kho.dicom_scp.qr import FindPlan

    archive: Archive = qr["archive"]
    identifier = _identifier(
        QueryRetrieveLevel="STUDY",
        PatientName="*",
        PatientID="",
        StudyInstanceUID="",
        StudyDate="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedInstances="",
        RetrieveAETitle="",
        PatientComments="",
    )
    identifier.add_new(0x00081110, "SQ", [])  # a sequence key: unsupported, answered empty
    plan = FindPlan(identifier, "STUDY")
    matches = list(query.find(archive.catalog, plan.level, plan.filters))
    assert len(matches) > 30
    for match in matches:
        for explicit in (False, True):
            direct = plan.encode(match, "KHO", explicit)
            assert direct == encode(plan.response(match, "KHO"), not explicit, True), match


def test_responses_larger_than_the_peer_pdu_take_pynetdicoms_path(qr: dict[str, Any]) -> None:
    """A peer with a tiny maximum PDU gets the same answers, fragmented by pynetdicom."""
    identifier = _identifier(
        QueryRetrieveLevel="STUDY",
        PatientID="Q*",
        StudyInstanceUID="",
        StudyDescription="",
        PatientName="",
        ModalitiesInStudy="",
    )
    model = StudyRootQueryRetrieveInformationModelFind
    answers = {}
    for max_pdu in (0, 200):
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", qr["port"], ae_title="KHO", max_pdu=max_pdu)
        assert assoc.is_established
        try:
            responses = list(assoc.send_c_find(identifier, model))
        finally:
            assoc.release()
        assert int(responses[-1][0].Status) == 0
        answers[max_pdu] = sorted(
            (str(a.StudyInstanceUID), str(a.PatientName)) for _s, a in responses[:-1]
        )
    assert len(answers[0]) == 6
    assert answers[0] == answers[200]


def test_c_cancel_stops_a_move(tmp_path: Path) -> None:
    """C-CANCEL during a C-MOVE of 150 instances: the move ends with Cancel (0xFE00) and
    the sub-operations still to do are counted as remaining, not sent."""
    from tests.archive.test_query import CT, _instance

    port = dcmtk.free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        fsync=False,
        move_destinations={"STORESCP": f"127.0.0.1:{port}"},
    )
    study = {"uid": pydicom.uid.generate_uid(), "date": "20240101", "time": "", "key": "c"}
    study.update(accession="", description="")
    series = {"uid": pydicom.uid.generate_uid(), "modality": "CT", "sop_class": CT, "number": 1}
    with Archive(settings) as archive:
        archive.derivers = []
        for number in range(1, 151):
            archive.ingest_part10(_instance("Q1", study, series, number))
        server = DicomServer(archive).start()
        try:
            with dcmtk.run_storescp(tmp_path / "dest", port=port) as scp:
                ae = AE(ae_title="PYSCU")
                model = "1.2.840.10008.5.1.4.1.2.2.2"  # study root MOVE
                ae.add_requested_context(model)
                assoc = ae.associate("127.0.0.1", server.port, ae_title="KHO")
                assert assoc.is_established
                identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study["uid"])
                responses = assoc.send_c_move(identifier, "STORESCP", model, msg_id=7)
                first_status, _ = next(responses)
                assert int(first_status.Status) == 0xFF00
                assoc.send_c_cancel(7, query_model=model)
                rest = list(responses)
                assoc.release()
                final = rest[-1][0]
                assert int(final.Status) == 0xFE00, final
                remaining = int(final.NumberOfRemainingSuboperations)
                completed = int(final.NumberOfCompletedSuboperations)
                assert remaining > 0
                assert completed + remaining + int(final.NumberOfFailedSuboperations) == 150
                assert len(scp.files()) == completed
            _still_serving(server.port)
        finally:
            server.stop()
