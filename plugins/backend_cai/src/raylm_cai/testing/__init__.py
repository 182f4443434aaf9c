"""FakeCML: a stand-in for the Cloudera ML REST API v2 that does real work behind the contract.

It follows the contract field for field (paths, snake_case JSON, `environment` as an
object on create and a JSON string in answers, int64 fields as strings, status
values, `next_page_token` paging, substring `search_filter`, gRPC-shaped errors)
and rejects what CML rejects. Behind it:

- a project is a folder (`template: git` clones `git_url` into it); it plays
  `/home/cdsw`, the project filesystem every workload of the project shares;
- an application or job run starts its script as a real local process, with the
  project folder as working directory and `HOME`, the `CDSW_*` environment CML gives
  and its own loopback IP (127.0.0.2, 127.0.0.3, ...) as `CDSW_IP_ADDRESS`, like a
  pod of its own; an application turns `APPLICATION_RUNNING` once its
  `CDSW_APP_PORT` answers HTTP, `APPLICATION_FAILED` when its process dies;
  stopping or deleting it ends every process of its "pod";
- a job run that succeeds starts the runs of the jobs that depend on it.

Faults for tests: `fake.faults.fail_requests(...)` (5xx, 429, ...),
`fake.faults.fail_applications(...)` (apps that cannot be scheduled),
`fake.starting_delay_s` (slow starts), and any key not in `api_keys` is refused.

    with FakeCML(tmp_path) as cml:
        project = cml.create_project("demo")
        env = cml.session_environment(project["id"])   # what a CML session of the project sees
        subprocess.run(["raylm", "cluster", "up", "--backend", "cai"], env=env)

Run one for your own automation: `python -m raylm_cai.testing --root DIR` prints its URL and key.
"""

from raylm_cai.testing.fake import DEFAULT_RUNTIME, FakeCML
from raylm_cai.testing.faults import Faults
from raylm_cai.testing.wire import APIError

__all__ = ["DEFAULT_RUNTIME", "APIError", "FakeCML", "Faults"]
