"""The decision core: pure numpy values, history, prediction, policies, placement, sharing, guard, loop."""
