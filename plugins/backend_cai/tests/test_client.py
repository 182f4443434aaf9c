"""The CML API client against the real HTTP of FakeCML: settings, retries, paging, errors."""

import pytest
from cai_setup import API_KEY, RUNTIME

from raylm_cai.client import CMLClient, CMLError, CMLSettings


def test_settings_inside_cml_come_from_the_workload_environment():
    environ = {
        "CDSW_API_URL": "https://ml-1234.example.cloudera.site/api/v1",
        "CDSW_APIV2_KEY": "secret-key",
        "CDSW_PROJECT_ID": "ab12-cd34-ef56-gh78",
    }
    settings = CMLSettings.resolve({}, environ)
    assert settings.url == "https://ml-1234.example.cloudera.site"
    assert settings.project == "ab12-cd34-ef56-gh78"
    assert settings.api_key == "secret-key"
    assert "secret-key" not in repr(settings)


def test_settings_outside_cml_come_from_options_environment_and_key_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    settings = CMLSettings.resolve(
        {"cml_url": "https://ml.example/", "project": "demo", "cml_api_key_file": str(key_file)},
        {"RAYLM_CML_API_KEY": "env-key"},
    )
    assert (settings.url, settings.project, settings.api_key) == ("https://ml.example", "demo", "file-key")
    from_env = CMLSettings.resolve(
        {}, {"RAYLM_CML_URL": "https://a", "RAYLM_CML_PROJECT": "p", "RAYLM_CML_API_KEY": "k"}
    )
    assert (from_env.url, from_env.project, from_env.api_key) == ("https://a", "p", "k")


@pytest.mark.parametrize(
    ("options", "environ", "says"),
    [
        ({}, {"RAYLM_CML_PROJECT": "p", "RAYLM_CML_API_KEY": "k"}, "no CML workbench URL"),
        ({"cml_url": "https://a"}, {"RAYLM_CML_API_KEY": "k"}, "no CML project"),
        ({"cml_url": "https://a", "project": "p"}, {}, "no CML API v2 key"),
        ({"cml_url": "https://a", "project": "p", "cml_api_key_file": "/no/key"}, {}, "cannot read the CML API key"),
    ],
)
def test_missing_settings_say_what_to_give(options, environ, says):
    with pytest.raises(CMLError, match=says):
        CMLSettings.resolve(options, environ)


def test_5xx_429_and_dropped_connections_are_retried(cml, project, client):
    cml.faults.fail_requests("POST", r"/jobs$", 503)
    cml.faults.fail_requests("POST", r"/jobs$", 429)
    before = len(cml.requests)
    job = client.call(
        "POST", f"projects/{project['id']}/jobs", {"name": "retried", "script": "x.py", "runtime_identifier": RUNTIME}
    )
    assert job["name"] == "retried"
    assert len(cml.requests) - before == 3
    assert [j["name"] for j in client.items(f"projects/{project['id']}/jobs", "jobs", {"name": "retried"})] == [
        "retried"
    ]


def test_retries_end_in_one_clear_error(cml, project, client):
    cml.faults.fail_requests("GET", r"^projects$", 503, times=10)
    retrying = CMLClient(cml.url, API_KEY, retries=2, backoff_s=0.01)
    with pytest.raises(CMLError, match="CML answered 503 to GET projects") as error:
        list(retrying.items("projects", "projects"))
    assert "\n" not in str(error.value)
    cml.faults.clear()
    unreachable = CMLClient("http://127.0.0.1:9", API_KEY, retries=1, backoff_s=0.01)
    with pytest.raises(CMLError, match="cannot reach CML at http://127.0.0.1:9"):
        unreachable.call("GET", "projects")


def test_lists_follow_every_page(cml, project, client):
    for index in range(23):
        client.call(
            "POST",
            f"projects/{project['id']}/jobs",
            {"name": f"paged-{index:02d}", "script": "x.py", "runtime_identifier": RUNTIME},
        )
    pages_before = sum(1 for r in cml.requests if r["path"].endswith("/jobs") and r["method"] == "GET")
    names = [j["name"] for j in client.items(f"projects/{project['id']}/jobs", "jobs", {"name": "paged-"})]
    assert sorted(names) == [f"paged-{i:02d}" for i in range(23)]
    # page_size is 100 here; the fake's default of 10 shows paging with a small page:
    page = client.call("GET", f"projects/{project['id']}/jobs", search_filter={"name": "paged-"})
    assert len(page["jobs"]) == 10 and page["next_page_token"]
    assert sum(1 for r in cml.requests if r["path"].endswith("/jobs") and r["method"] == "GET") > pages_before


def test_a_bad_key_is_one_line_without_the_key(cml):
    client = CMLClient(cml.url, "wrong-key-abc", backoff_s=0.01)
    with pytest.raises(CMLError) as error:
        client.find_project("demo")
    message = str(error.value)
    assert error.value.status == 401
    assert "refused the API key" in message and "wrong-key-abc" not in message and "\n" not in message


def test_projects_are_found_by_id_or_exact_name(cml, project, client):
    cml.create_project("demo-two")
    assert client.find_project(project["id"])["id"] == project["id"]
    assert client.find_project("demo")["id"] == project["id"]  # not "demo-two", which also contains "demo"
    with pytest.raises(CMLError, match="no CML project 'nope'"):
        client.find_project("nope")


def test_client_sends_no_field_cml_would_drop(cml):
    assert cml.unknown_fields == []


def test_inside_a_cml_workload_the_default_backend_is_cai(installed_registry):
    assert installed_registry.default_backend({"CDSW_PROJECT_ID": "ab12-cd34-ef56-gh78"}) == "cai"
    assert installed_registry.default_backend({}) == "local"
