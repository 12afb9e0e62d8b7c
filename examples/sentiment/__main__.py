from examples.sentiment.pipeline import main

main()
