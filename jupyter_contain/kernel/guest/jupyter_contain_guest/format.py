"""Plain-text and HTML renderings of the host's answers (sizes, stats, diff summaries).

Standard library only (the image's Python, 3.7+). Must not talk to the host.
"""

import html


def size(n):
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return "?"


def stats_text(st):
    lim = st.get("memory_limit")
    lines = [
        "memory:    %s of %s (peak %s)" % (size(st.get("memory_current")), size(lim) if lim else "no limit",
                                           size(st.get("memory_peak"))),
        "cpu time:  %.2f s%s" % ((st.get("cpu_usage_ns") or 0) / 1e9,
                                 (" (limit %g cpus)" % st["cpus_limit"]) if st.get("cpus_limit") else ""),
        "processes: %s of %s" % (st.get("pids_current"), st.get("pids_limit") or "no limit"),
    ]
    if st.get("oom_kills"):
        lines.append("oom kills: %s" % st["oom_kills"])
    return "\n".join(lines)


def diff_text(d):
    out = ["%d change(s), %s" % (d["total"], size(d["bytes"]))]
    for s in d["summary"]:
        out.append("  %-24s %6d  %10s" % (s["folder"], s["count"], size(s["bytes"])))
    if d["changes"]:
        out.append("")
        for ch in d["changes"]:
            out.append("%s %s" % (ch["kind"], ch["path"]))
        if d.get("truncated"):
            out.append("... (%d more)" % (d["total"] - len(d["changes"])))
    if d.get("left_out_total"):
        out.append("")
        out.append(left_out_text(d))
    return "\n".join(out)


def left_out_text(d):
    """What a diff or snapshot left out (the kernel's runtime state): count, size, the first paths."""
    shown = [ch["path"] for ch in d.get("left_out") or ()]
    out = ["left out (kernel runtime state, never in a snapshot unless --include-runtime-state): "
           "%d entr%s, %s" % (d["left_out_total"], "y" if d["left_out_total"] == 1 else "ies",
                              size(d.get("left_out_bytes")))]
    out.extend("  - %s" % p for p in shown)
    if d["left_out_total"] > len(shown):
        out.append("  ... (%d more)" % (d["left_out_total"] - len(shown)))
    return "\n".join(out)


def diff_html(d):
    rows = "".join(
        "<tr><td><code>%s</code></td><td style='text-align:right'>%d</td><td style='text-align:right'>%s</td></tr>"
        % (html.escape(s["folder"]), s["count"], size(s["bytes"])) for s in d["summary"])
    left = ""
    if d.get("left_out_total"):
        names = ", ".join("<code>%s</code>" % html.escape(ch["path"]) for ch in (d.get("left_out") or ())[:5])
        left = ("<p style='color:#666'>Left out of a snapshot (the kernel's runtime state): %d entr%s, %s%s</p>"
                % (d["left_out_total"], "y" if d["left_out_total"] == 1 else "ies", size(d.get("left_out_bytes")),
                   (": " + names + (", ..." if d["left_out_total"] > 5 else "")) if names else ""))
    if not rows:
        return "<p>No changes against the image yet.</p>" + left
    return ("<p>%d change(s), %s, against the image:</p>"
            "<table><thead><tr><th>folder</th><th>changes</th><th>size</th></tr></thead>"
            "<tbody>%s</tbody></table>" % (d["total"], size(d["bytes"]), rows)) + left
