"""The parts of ``Store``, one per aggregate (a package of their own, so that their
names never shadow the tables of the same name that ``clusterfeed.store`` exports)."""
