{:ok, _} = Application.ensure_all_started(:erpy)
ExUnit.start()
