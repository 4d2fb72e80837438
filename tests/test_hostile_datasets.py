"""Dataset folders that are malformed or malicious, each made by the test."""

import numpy as np
import pytest

from core_jax import datasets

CLASSES = "id,name\n0,cat\n1,dog\n"


def make_dataset(root, *, classes=CLASSES, test="filename,class_id\na.png,0\n"):
    root.mkdir(parents=True, exist_ok=True)
    if classes is not None:
        data = classes if isinstance(classes, bytes) else classes.encode()
        (root / "class_mapping.csv").write_bytes(data)
    data = test if isinstance(test, bytes) else test.encode()
    (root / "test.csv").write_bytes(data)
    for name in ("a.png", "b.jpg", "c.png"):
        (root / name).write_bytes(b"pixels")
    return root


def expect_error(root, *words, **kwargs):
    with pytest.raises(datasets.DatasetError) as caught:
        datasets.from_csv(root, "test", **kwargs)
    message = str(caught.value)
    for word in words:
        assert word in message, message
    assert isinstance(caught.value, ValueError)
    return message


def test_minimal_folder_loads(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\na.png,0\nb,1\n")
    split = datasets.from_csv(root, "test")
    assert split.paths == [str(root / "a.png"), str(root / "b.jpg")]
    np.testing.assert_array_equal(split.labels, [0, 1])
    assert split.class_names == ["cat", "dog"]


def test_missing_split_file_lists_what_exists(tmp_path):
    root = make_dataset(tmp_path / "d")
    with pytest.raises(datasets.DatasetError, match=r"'val' not found.*test.csv"):
        datasets.from_csv(root, "val")


def test_missing_class_mapping(tmp_path):
    root = make_dataset(tmp_path / "d", classes=None)
    expect_error(root, "class_mapping.csv", "not found")


def test_missing_column_names_columns_found(tmp_path):
    root = make_dataset(tmp_path / "d", test="file,label\na.png,0\n")
    expect_error(root, "test.csv", "['filename', 'class_id']", "['file', 'label']")


def test_missing_class_column(tmp_path):
    root = make_dataset(tmp_path / "d", classes="id,label\n0,cat\n")
    expect_error(root, "class_mapping.csv", "['name']", "['id', 'label']")


def test_class_id_out_of_range(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\na.png,0\nb.jpg,2\n")
    expect_error(root, "test.csv", "line 3", "class_id 2", "0..1")


def test_negative_class_id(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\na.png,-1\n")
    expect_error(root, "line 2", "class_id -1")


def test_non_integer_class_id(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\na.png,cat\n")
    expect_error(root, "line 2", "'cat'", "integer")


def test_duplicate_class_names(tmp_path):
    root = make_dataset(tmp_path / "d", classes="id,name\n0,cat\n1,dog\n2,cat\n")
    expect_error(root, "class_mapping.csv", "line 4", "'cat'", "line 2")


def test_class_ids_with_a_gap(tmp_path):
    root = make_dataset(tmp_path / "d", classes="id,name\n0,cat\n5,dog\n")
    expect_error(root, "class_mapping.csv", "[5]")


def test_repeated_class_id(tmp_path):
    root = make_dataset(tmp_path / "d", classes="id,name\n0,cat\n0,dog\n")
    expect_error(root, "line 3", "repeated")


def test_non_utf8_bytes_name_line_and_offset(tmp_path):
    # "café" in cp1252 on line 3.
    classes = b"id,name\n0,cat\n1,caf\xe9\n"
    root = make_dataset(tmp_path / "d", classes=classes)
    expect_error(
        root, "class_mapping.csv", "line 3", "0xe9", f"offset {len(classes) - 2}"
    )


def test_bom_and_crlf_are_fine(tmp_path):
    root = make_dataset(
        tmp_path / "d",
        classes="\ufeffid,name\r\n0,cat\r\n1,dög\r\n".encode(),
        test="\ufefffilename,class_id\r\na.png,1\r\n\r\n".encode(),
    )
    split = datasets.from_csv(root, "test")
    assert split.class_names == ["cat", "dög"]
    np.testing.assert_array_equal(split.labels, [1])


def test_row_with_wrong_field_count(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\na.png,0,extra\n")
    expect_error(root, "line 2", "3 fields")


def test_nul_byte_in_csv(tmp_path):
    root = make_dataset(tmp_path / "d", test=b"filename,class_id\na.p\x00ng,0\n")
    expect_error(root, "test.csv", "line")


def test_empty_split(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\n")
    expect_error(root, "no rows")


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "../outside.png",
        "sub/../../outside.png",
        "/etc/passwd",
        "..\\..\\windows\\win.ini",
        "C:\\Windows\\win.ini",
    ],
)
def test_path_leaving_root_is_refused_and_never_read(tmp_path, name):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"secret")
    root = make_dataset(tmp_path / "d", test=f"filename,class_id\n{name},0\n")
    expect_error(root, "line 2", "leaves the image folder", repr(name))


def test_dotdot_that_stays_inside_is_allowed(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\nsub/../a.png,0\n")
    assert datasets.from_csv(root, "test").paths == [str(root / "a.png")]


def test_missing_listed_file_raises_by_default(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\ngone.png,0\n")
    expect_error(root, "line 2", "'gone.png'", "does not exist", "on_missing")


def test_missing_listed_file_is_skipped_and_counted(tmp_path):
    root = make_dataset(
        tmp_path / "d", test="filename,class_id\na.png,0\ngone.png,1\nnope,1\n"
    )
    split = datasets.from_csv(root, "test", on_missing="skip")
    assert split.paths == [str(root / "a.png")]
    assert [(line, name) for line, name, _ in split.skipped] == [
        (3, "gone.png"),
        (4, "nope"),
    ]
    np.testing.assert_array_equal(split.class_counts, [1, 0])


def test_extension_lookup_refuses_ambiguity(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\nx,0\n")
    (root / "x.jpg").write_bytes(b"one")
    (root / "x.png").write_bytes(b"two")
    expect_error(root, "ambiguous", "x.jpg", "x.png")


def test_extension_lookup_order(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\nc,0\n")
    assert datasets.from_csv(root, "test").paths == [str(root / "c.png")]


def test_images_dir_separate_from_root(tmp_path):
    root = make_dataset(tmp_path / "d", test="filename,class_id\nsub/z.jpeg,1\n")
    images = tmp_path / "pictures"
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "z.jpeg").write_bytes(b"z")
    split = datasets.from_csv(root, "test", images_dir=images)
    assert split.paths == [str(images / "sub" / "z.jpeg")]


def test_common_names_must_cover_every_class(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "class_mapping_common.csv").write_text("id,name\n0,house cat\n")
    expect_error(root, "class_mapping_common.csv", "1 common names for 2 classes")


def test_unknown_missing_policy_is_refused(tmp_path):
    root = make_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match="on_missing"):
        datasets.from_csv(root, "test", on_missing="ignore")
