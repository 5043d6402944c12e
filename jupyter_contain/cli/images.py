"""``jupyter contain`` verbs about images: images, inspect, tag, rmi, gc, df, import, save."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from types import ModuleType

from ..errors import ImageError
from ..runtime.images.store import ImageRecord, Store
from ..runtime.spec import Reference, digest_hex
from .output import emit_json, human_size, table


def _store(args: argparse.Namespace) -> Store:
    return Store(args.root)


def _archive() -> ModuleType:
    # import/save only: it brings the layer code and its compression libraries
    from ..runtime.images import archive
    return archive


def _image_json(rec: ImageRecord) -> dict:
    return {
        "name": rec.name,
        "digest": rec.digest,
        "media_type": rec.descriptor.media_type,
        "index_digest": rec.index_digest,
        "id": rec.id,
        "size": rec.size,
        "created": rec.config.created,
        "layers": [d.to_json() for d in rec.manifest.layers],
        "diff_ids": list(rec.config.diff_ids),
        "platform": str(rec.config.platform),
        "config": rec.config.raw.get("config", {}),
    }


def cmd_images(args: argparse.Namespace) -> int:
    recs = sorted(_store(args).images(), key=lambda r: r.name)
    if args.json:
        emit_json([_image_json(r) for r in recs])
    elif args.quiet:
        for r in recs:
            print(digest_hex(r.id)[:12])
    else:
        table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], [
            (Reference.parse(r.name).familiar.rsplit(":", 1)[0], Reference.parse(r.name).tag or "<none>",
             digest_hex(r.id)[:12], (r.config.created or "")[:19].replace("T", " "), human_size(r.size))
            for r in recs
        ])
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    emit_json([_image_json(store.resolve(name)) for name in args.images])
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = _store(args)
    rec = store.resolve(args.source)
    store.tag(args.target, rec.descriptor, index_digest=rec.index_digest)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in args.images:
        rec = store.rmi(name, force=args.force)
        print(f"Untagged: {rec.familiar}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ..runtime.containers.container import Runtime

    store = _store(args)
    cleaned = Runtime(store).gc()   # containers first: what they release, the store may collect
    report = store.gc()
    if args.json:
        emit_json({**report.__dict__, "containers_cleaned": cleaned})
    else:
        if cleaned:
            print(f"cleaned {len(cleaned)} dead containers and stray cgroups:")
            for item in cleaned:   # what gc removed, one a line (a container's full id, cgroup:NAME, ...)
                print(f"  {item}")
        print(f"removed {report.blobs_removed} blobs and {report.layers_removed} unpacked layers, "
              f"freed {human_size(report.bytes_freed)}")
    return 0


def cmd_df(args: argparse.Namespace) -> int:
    du = _store(args).disk_usage()
    if args.json:
        emit_json({"blobs": du.blobs_bytes, "layers": du.layers_bytes, "containers": du.containers_bytes,
                   "images": [{"name": n, "unique": u, "shared": s} for n, u, s in du.images]})
        return 0
    table(["TYPE", "SIZE"], [("blobs (compressed)", human_size(du.blobs_bytes)),
                             ("unpacked layers", human_size(du.layers_bytes)),
                             ("containers", human_size(du.containers_bytes))])
    if du.images:
        print()
        table(["IMAGE", "UNIQUE", "SHARED"],
              [(Reference.parse(n).familiar, human_size(u), human_size(s)) for n, u, s in du.images])
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    store = _store(args)
    src = Path(args.source)
    ref = None
    if not src.exists() and ":" in args.source:  # LAYOUT:REF
        path, ref = args.source.split(":", 1)
        src = Path(path)
    if not src.exists():
        raise ImageError(f"{args.source}: no such file or directory")
    fmt = args.format if args.format != "auto" else _archive().detect_format(src)
    if fmt == "rootfs":
        if not args.name:
            raise ImageError("importing a root filesystem tarball needs a NAME for the image")
        rec = _archive().import_rootfs(
            store, src, args.name,
            env=args.env or _archive().DEFAULT_ENV,
            cmd=shlex.split(args.cmd) if args.cmd else ("/bin/sh",),
            entrypoint=shlex.split(args.entrypoint) if args.entrypoint else (),
            workdir=args.workdir or "", user=args.user or "",
        )
    elif fmt == "oci":
        rec = _archive().import_oci_layout(store, src, ref=ref, name=args.name)
    elif fmt == "oci-archive":
        rec = _archive().import_oci_archive(store, src, ref=ref, name=args.name)
    elif fmt == "docker-archive":
        rec = _archive().import_docker_archive(store, src, name=args.name)
    else:
        raise ImageError(f"unknown import format {fmt!r}")
    if args.json:
        emit_json(_image_json(rec))
    else:
        print(f"{rec.familiar} {rec.digest}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    store = _store(args)
    rec = store.resolve(args.image)
    out = Path(args.output)
    if args.format == "oci-archive":
        _archive().save_oci_archive(store, rec, out)
    else:
        _archive().save_docker_archive(store, rec, out)
    print(f"saved {rec.familiar} to {out} ({args.format})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="list images in the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("inspect", help="show an image's manifest and config as JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("source", metavar="IMAGE")
    p.add_argument("target", metavar="NAME[:TAG]")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("rmi", help="remove image tags (refuses while a container uses the image)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true", help="remove even if a container uses it")
    p.set_defaults(func=cmd_rmi)

    p = sub.add_parser("gc", help="clean up dead containers, then blobs and layers nothing references")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("df", help="show disk space used by the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_df)

    p = sub.add_parser("import", help="import a rootfs tarball, OCI layout, oci-archive or docker-archive",
                       description="Import an image. SOURCE is a root filesystem tarball (plain, gzip or zstd), "
                                   "an OCI layout directory (DIR or DIR:REF), an oci-archive or a docker-archive; "
                                   "the format is detected unless --format says.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("name", nargs="?", metavar="NAME[:TAG]", help="name for the imported image")
    p.add_argument("--format", choices=["auto", "rootfs", "oci", "oci-archive", "docker-archive"], default="auto")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="(rootfs) environment variable")
    p.add_argument("--cmd", help="(rootfs) default command, shell-quoted")
    p.add_argument("--entrypoint", help="(rootfs) entrypoint, shell-quoted")
    p.add_argument("-w", "--workdir", help="(rootfs) working directory")
    p.add_argument("-u", "--user", help="(rootfs) user")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("save", help="write an image to an oci-archive or docker-archive")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--format", choices=["oci-archive", "docker-archive"], default="oci-archive")
    p.set_defaults(func=cmd_save)


