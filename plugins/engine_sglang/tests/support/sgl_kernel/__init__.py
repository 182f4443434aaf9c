"""TEST-ONLY stand-in for SGLang's CPU kernel package; see ../README.md."""

from sgl_kernel._missing import __getattr__  # noqa: F401  (module-level fallback for every other name)


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """For request i, put its next end_offset[i] - start_offset[i] cache locations into row req_pool_indices[i]."""
    taken = 0
    for index in range(len(req_pool_indices)):
        start, end = int(start_offset[index]), int(end_offset[index])
        req_to_token[int(req_pool_indices[index]), start:end] = out_cache_loc[taken : taken + end - start]
        taken += end - start
