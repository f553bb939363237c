"""tidepool_wheel: the wheel, assembled from Bazel-built artifacts by assemble_wheel.py.

The output is a directory holding one file, tidepool-VERSION-py3-none-PLATFORM.whl: the platform
tag is computed from the binaries when the wheel is assembled (assemble_wheel.py says how), so
the file's name is not known before, and a directory (a tree artifact) is what a rule can
declare. tools/build_wheel copies the wheel out of it; tests/wheel reads it there.
"""

def _tidepool_wheel_impl(ctx):
    out = ctx.actions.declare_directory(ctx.label.name)
    package = ctx.attr.package
    prefix = package.label.package + "/" if package.label.package else ""
    args = ctx.actions.args()
    args.add("--out_dir", out.path)
    args.add("--version_file", ctx.file.version_file)
    args.add("--library", ctx.file.library)
    args.add("--tool", ctx.file.tool)
    inputs = [ctx.file.version_file, ctx.file.library, ctx.file.tool]
    if ctx.file.preload:
        args.add("--preload", ctx.file.preload)
        inputs.append(ctx.file.preload)
    sources = package[PyInfo].transitive_sources.to_list()
    for src in sources:
        if not src.short_path.startswith(prefix):
            fail("%s is outside %s" % (src.short_path, prefix))
        args.add_all("--source", [src.path, src.short_path[len(prefix):]])
    ctx.actions.run(
        executable = ctx.executable._assembler,
        arguments = [args],
        inputs = inputs + sources,
        outputs = [out],
        mnemonic = "TidepoolWheel",
        progress_message = "Assembling the tidepool wheel",
    )
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out]))]

tidepool_wheel = rule(
    implementation = _tidepool_wheel_impl,
    attrs = {
        "package": attr.label(mandatory = True, providers = [PyInfo]),
        "version_file": attr.label(mandatory = True, allow_single_file = True),
        "library": attr.label(mandatory = True, allow_single_file = True),
        "tool": attr.label(mandatory = True, allow_single_file = True),
        "preload": attr.label(allow_single_file = True),
        "_assembler": attr.label(
            default = "//integrations/python/wheel:assemble_wheel",
            executable = True,
            cfg = "exec",
        ),
    },
)
