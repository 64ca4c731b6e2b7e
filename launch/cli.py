def main() -> int:
    raise SystemExit("lpreg: not yet wired")
