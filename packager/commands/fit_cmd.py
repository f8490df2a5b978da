"""`packager fit --bundles DIR|REPORT [--ram 2GB] [--storage 500MB] [--profile NAME] [--directions en->de]`."""
from __future__ import annotations

import click


def _profiles_help() -> str:
    from packager.fit import PROFILES, human

    return "; ".join(f"{name}: RAM {human(p['ram_bytes'])}, storage {human(p['storage_bytes'])}, {p['threads']} threads"
                     for name, p in PROFILES.items())


@click.command("fit")
@click.option("--bundles", "source", required=True, type=click.Path(path_type=str),
              help="a directory of bundles (or one bundle / .tar), or a report.json of `packager report`")
@click.option("--ram", default=None, help="RAM the translator may use, e.g. 2GB, 1.5GiB (overrides the profile)")
@click.option("--storage", default=None, help="storage for the bundle files, e.g. 500MB (overrides the profile)")
@click.option("--profile", default=None, help="a device profile: pi4-2gb, pi5-8gb, phone-3gb, laptop-8gb")
@click.option("--directions", multiple=True, help="directions to pick for (default: every one offered), e.g. en->de")
@click.option("--list-profiles", is_flag=True, help="print the device profiles and exit")
def fit_command(source, ram, storage, profile, directions, list_profiles):
    """Print the best bundle for each direction that fits a device (highest chrF++; ties go to
    less RAM, then fewer bytes) and why the others do not. Exit status 1 when a direction has
    no bundle that fits."""
    from packager.fit import PROFILES, FitError, describe, fit, human, load_candidates, parse_size
    from runtime.errors import LanguageError
    from runtime.languages import parse_pair_list

    if list_profiles:
        for name, p in PROFILES.items():
            click.echo(f"{name}: RAM {human(p['ram_bytes'])}, storage {human(p['storage_bytes'])}, "
                       f"{p['threads']} threads ({p['note']})")
        return 0
    ram_bytes = storage_bytes = None
    if profile is not None:
        if profile not in PROFILES:
            raise FitError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        ram_bytes, storage_bytes = PROFILES[profile]["ram_bytes"], PROFILES[profile]["storage_bytes"]
    if ram is not None:
        ram_bytes = parse_size(ram, "--ram")
    if storage is not None:
        storage_bytes = parse_size(storage, "--storage")
    if ram_bytes is None and storage_bytes is None:
        raise click.UsageError("give --ram and/or --storage, or --profile")
    try:
        wanted = [str(p) for p in parse_pair_list(list(directions))] if directions else None
    except LanguageError as exc:
        raise FitError(f"--directions: {exc}") from None
    results = fit(load_candidates(source), wanted, ram_bytes, storage_bytes)
    lines, ok = describe(results, ram_bytes, storage_bytes)
    if profile is not None:
        lines.insert(0, f"profile {profile}: {PROFILES[profile]['note']}; run with --threads {PROFILES[profile]['threads']}")
    for line in lines:
        click.echo(line)
    if not ok:
        click.echo("error: no bundle fits for " + ", ".join(d for d, v in results.items() if not any(x.fits for x in v))
                   + "; give more RAM/storage, or build a smaller bundle (higher drop ratio, Q4_K_M)", err=True)
        return 1
    return 0
