"""BlackBIRDS 1.3 compatibility: every shim that exists only so that a script written for
BlackBIRDS' public API runs on gradcal with its imports renamed.

Each shim lives in a module of this package and is re-exported, with one import line, at
the path BlackBIRDS users import it from. gradcal's own API never depends on this
package. ``docs/migrating-from-blackbirds.md`` lists the deliberate differences.
"""

__all__: list[str] = []
