"""raylm's records on disk: what two raylm processes writing at once must not break."""

import threading

from raylm.state import write_atomically


def test_writers_of_one_file_at_once_never_fail_nor_leave_half_a_file(tmp_path):
    path = tmp_path / "record.json"
    errors = []

    def write(text):
        try:
            for _ in range(300):
                write_atomically(path, text, mode=0o600)
        except OSError as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(letter * 10_000,)) for letter in "abcd"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == []
    assert path.read_text() in {letter * 10_000 for letter in "abcd"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left
