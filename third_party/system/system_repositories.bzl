"""Repository rules for system dependencies that live outside a fixed path."""

def _cuda_headers_impl(ctx):
    root = ctx.os.environ.get("CUDA_PATH") or ctx.os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    header = ctx.path(root + "/include/cuda.h")
    if not header.exists:
        fail("tidepool: no CUDA toolkit headers at %s (set CUDA_PATH or CUDA_HOME)" % root)
    ctx.symlink(header, "include/cuda.h")
    ctx.file("BUILD", """
cc_library(
    name = "cuda_headers",
    hdrs = ["include/cuda.h"],
    includes = ["include"],
    visibility = ["//visibility:public"],
)
""")

cuda_headers_repository = repository_rule(
    implementation = _cuda_headers_impl,
    environ = ["CUDA_PATH", "CUDA_HOME"],
    local = True,
)
