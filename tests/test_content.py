"""Content keys (wsiseg.content): a slide's fingerprint and the weights' sha256 follow the
bytes, not the modification time, and the cache of them follows the file's state, so a
file replaced under an old mtime (cp -p, rsync -t) is always read again."""

import hashlib
import os
import shutil

import pytest
from conftest import CMU, DICOM, REPO, needs_data

from wsiseg.content import BLOCK, KeyCache, file_sha256, fingerprint, slide_files

pytestmark = needs_data  # reads ../shared/data

OLD = (978307200, 978307200)  # 2001-01-01: older than any result


def test_fingerprint_follows_bytes_not_mtime(tmp_path):
    a = tmp_path / "a.svs"
    shutil.copyfile(CMU, a)  # new mtime
    b = tmp_path / "b.svs"
    shutil.copy2(CMU, b)  # cp -p: the original's mtime
    fa = fingerprint(str(a))
    assert fa == fingerprint(str(b)) == fingerprint(str(CMU)) and fa.startswith(f"fp1:{os.path.getsize(CMU)}:")
    os.utime(a, OLD)
    assert fingerprint(str(a)) == fa  # touched: the same slide
    data = bytearray(CMU.read_bytes())
    for where in (0, len(data) // 2, len(data) - 1):  # a change in any of the three blocks
        changed = data.copy()
        changed[where] ^= 0xFF
        a.write_bytes(changed)
        assert fingerprint(str(a)) != fa, where
    a.write_bytes(data[:-1])  # truncated by one byte: another size
    assert fingerprint(str(a)) != fa
    assert len(data) > 3 * BLOCK  # three blocks read, not the whole file


def test_dicom_fingerprint_covers_every_file_of_the_series(tmp_path):
    series = tmp_path / "series"
    shutil.copytree(DICOM.parent, series)
    member = series / DICOM.name
    files = slide_files(str(member))
    assert len(files) == 12 and files[0] == str(member)
    before = fingerprint(str(member))
    other = series / "level-5-frames-0-1.dcm"
    assert other.exists()
    data = bytearray(other.read_bytes())
    data[len(data) // 2] ^= 0xFF
    other.write_bytes(data)
    assert fingerprint(str(member)) != before  # a level of the series changed: another slide


def test_weights_sha256_is_the_whole_files():
    weights = REPO / "models" / "nuclei-unet.pt"
    assert file_sha256(str(weights)) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_cache_reads_a_file_once_and_again_when_replaced_under_its_old_mtime(tmp_path):
    slide = tmp_path / "case01.svs"
    shutil.copy2(CMU, slide)
    os.utime(slide, OLD)
    reads = []

    def counted(path):
        reads.append(path)
        return fingerprint(path)

    store = str(tmp_path / "keys.tsv")
    cache = KeyCache(store)
    first = cache.get("fingerprint", str(slide), counted)
    assert cache.get("fingerprint", str(slide), counted) == first and len(reads) == 1
    cache.save()
    later = KeyCache(store)  # the next snakemake invocation
    assert later.get("fingerprint", str(slide), counted) == first and len(reads) == 1  # a stat, no read
    os.utime(slide)  # touched: mtime changed, content not: read again, same key
    assert later.get("fingerprint", str(slide), counted) == first and len(reads) == 2
    # cp -p of other content onto the same path, and the old mtime put back (as rsync -t does)
    data = bytearray(CMU.read_bytes())
    data[len(data) // 2] ^= 0xFF
    other = tmp_path / "rescan.svs"
    other.write_bytes(data)
    os.utime(other, OLD)
    shutil.copy2(other, slide)
    assert os.stat(slide).st_mtime == OLD[1]  # the mtime says nothing changed; ctime does
    assert later.get("fingerprint", str(slide), counted) != first and len(reads) == 3
    later.save()
    assert KeyCache(store).slide_fingerprint(str(slide)) == fingerprint(str(other))


def test_cache_that_cannot_be_written_only_costs_time(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = KeyCache(str(blocker / "keys.tsv"))  # its folder cannot be made
    assert cache.sha256(str(CMU)) == file_sha256(str(CMU))
    cache.save()
    assert not (blocker / "keys.tsv").exists()


@pytest.mark.parametrize("name", ["a\tb.svs"])
def test_paths_that_break_the_table_are_not_cached(tmp_path, name):
    slide = tmp_path / name
    shutil.copyfile(CMU, slide)
    store = tmp_path / "keys.tsv"
    cache = KeyCache(str(store))
    assert cache.slide_fingerprint(str(slide)) == fingerprint(str(slide))
    cache.save()
    assert store.read_text() == ""
